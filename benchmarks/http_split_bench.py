"""The HTTP cost of the engine in the API's process, and without it: `fitserve serve` started with
--no-engine-process, then --engine-process (docs/engine_process.md), each driven by `fitserve bench`
over HTTP; one JSON line per mode (duration, req/s, TTFT median, ITL p99).

    python benchmarks/http_split_bench.py --model configs/llama-3-8b-instruct --load-format dummy

Every argument is passed to `fitserve serve` (both modes), except those after `--bench`, which
go to `fitserve bench` after `--workload W2` (a later --workload wins). W2 on an H200 runs in
about 20-30 s per mode, plus each server's start-up. The servers' logs stay in --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from fitserve.bench.server_process import ServerProcess, free_port

MODES = {"in_process": "--no-engine-process", "engine_process": "--engine-process"}
START_TIMEOUT_S = 600.0  # an 8B model with dummy weights and CUDA graphs starts in about a minute


def run_mode(mode: str, serve_flags: list[str], bench_flags: list[str], out: Path) -> dict:
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "fitserve", "serve", "--port", str(port), "--log-level", "warning",
                            "--disable-log-stats", *serve_flags, MODES[mode]], out / f"serve-{mode}.log", port)
    started = server.start(START_TIMEOUT_S)
    try:
        if not started.ready:
            return {"mode": mode, "error": started.error or f"exit code {started.exit_code}"}
        result_path = out / f"bench-{mode}.json"
        bench = [sys.executable, "-m", "fitserve", "bench", "--base-url", server.base_url, "--workload", "W2",
                 "--disable-tqdm", "--metric-percentiles", "50,99", "--save-result", str(result_path), *bench_flags]
        done = subprocess.run(bench, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            return {"mode": mode, "error": done.stderr[-2000:]}
        result = json.loads(result_path.read_text())
    finally:
        server.stop()
    return {"mode": mode, "duration_s": round(result["duration"], 3),
            "request_throughput": round(result["request_throughput"], 3),
            "median_ttft_ms": round(result["median_ttft_ms"], 1), "p99_itl_ms": round(result["p99_itl_ms"], 1),
            "completed": result["completed"], "server_startup_s": round(started.startup_s, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(f"benchmarks/results/http-split-{int(time.time())}"))
    parser.add_argument("--modes", default=",".join(MODES), help="which of in_process,engine_process to run")
    args, rest = parser.parse_known_args()
    serve_flags, bench_flags = (rest[:rest.index("--bench")], rest[rest.index("--bench") + 1:]) \
        if "--bench" in rest else (rest, [])
    args.out.mkdir(parents=True, exist_ok=True)
    failed = False
    for mode in args.modes.split(","):
        line = run_mode(mode, serve_flags, bench_flags, args.out)
        failed |= "error" in line
        print(json.dumps(line), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
