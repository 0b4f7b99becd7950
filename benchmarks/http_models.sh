#!/usr/bin/env bash
# W1 and W2 through HTTP for several model shapes in one device call: http_record.py once per
# "config-folder:api-server-counts[:repeats]" argument, each into its own folder, then one archive and one
# combined table under $OUT (the device returns at most 8 files).
#
#   bash benchmarks/http_models.sh configs/gemma-3-12b-it:1 configs/qwen3-8b:1 configs/mistral-7b-v0.1:1,2:3
#
# WORKLOADS (default "W1 W2"): which of them.
# repeats (default REPEATS, else 1): runs of each workload through one server, the median reported.
# BUDGET_S (default 560) is the whole call's: a model whose http_record.py would start with less
# than 100 s left is skipped and said so in the table.
set -u
OUT=${OUT:-benchmarks/results/http-models-$(date +%s)}
BUDGET_S=${BUDGET_S:-560}
WORK=$(mktemp -d)
mkdir -p "$OUT"
start=$(date +%s)
for spec in "$@"; do
    IFS=: read -r config counts repeats <<<"$spec"
    name=$(basename "$config")
    left=$((BUDGET_S - ($(date +%s) - start)))
    if [ "$left" -lt 100 ]; then
        echo "## $name: skipped, ${left} s left" >>"$OUT/http_models.md"
        continue
    fi
    python benchmarks/http_record.py --model-config "$config" --workloads ${WORKLOADS:-W1 W2} \
        --api-server-counts ${counts//,/ } --repeats "${repeats:-${REPEATS:-1}}" --budget-s "$left" --out "$WORK/$name" >"$WORK/$name.stdout" 2>&1
    echo "exit $? for $name"
    { echo "## $name ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
      cat "$WORK/$name/http_record.md" 2>/dev/null || tail -20 "$WORK/$name.stdout"
      echo; } >>"$OUT/http_models.md"
    cat "$WORK/$name/http_record.jsonl" 2>/dev/null | sed "s/^{/{\"model\": \"$name\", /" >>"$OUT/http_models.jsonl"
done
tar -czf "$OUT/http_models.tar.gz" -C "$WORK" .
cat "$OUT/http_models.md"
