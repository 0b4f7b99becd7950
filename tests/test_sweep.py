"""fitserve sweep: the grid, the server's error paragraph, the table, the advice, the plots,
and one real sweep (the embedded model) with a start-up failure row."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fitserve.bench.client import BenchError
from fitserve.bench.server_process import error_paragraph
from fitserve.bench.sweep import grid_points, parse_grid, point_flags, point_label
from fitserve.bench.sweep_report import advice, markdown_table, ordered, plot_sweep
from fitserve.bench.workloads import resolve_workload
from fitserve.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
PNG_MAGIC = b"\x89PNG"


def test_grid_parsing_and_points():
    axes = parse_grid(["max_num_seqs=1,4", "--kv-cache-memory-bytes=default,64MiB"])
    assert [(a.name, a.flag, a.values) for a in axes] == [
        ("max_num_seqs", "--max-num-seqs", ("1", "4")),
        ("kv_cache_memory_bytes", "--kv-cache-memory-bytes", ("default", "64MiB"))]
    points = grid_points(axes)
    assert [point_label(p) for p in points] == [
        "max_num_seqs=1, kv_cache_memory_bytes=default", "max_num_seqs=1, kv_cache_memory_bytes=64MiB",
        "max_num_seqs=4, kv_cache_memory_bytes=default", "max_num_seqs=4, kv_cache_memory_bytes=64MiB"]
    assert point_flags(points[1]) == ["--max-num-seqs", "1", "--kv-cache-memory-bytes", "64MiB"]
    assert point_flags(points[0]) == ["--max-num-seqs", "1"]  # 'default' leaves the flag out
    for bad in (["max_num_seqs"], ["=1,2"], ["max_num_seqs="], ["a=1", "a=2"]):
        with pytest.raises(BenchError):
            parse_grid(bad)


def test_error_paragraph_is_the_last_one_without_progress_bars():
    log = ("Loading:  10%|#         |\rLoading: 100%|##########|\n\n"
           "INFO: starting\n\nfitserve: The KV cache holds 32 tokens,\nfewer than --max-model-len 512.\n\n")
    assert error_paragraph(log) == "fitserve: The KV cache holds 32 tokens,\nfewer than --max-model-len 512."
    assert error_paragraph("") == ""


def row(index: int, seqs: str, req_s: float | None, *, e2e_ms: float = 100.0, preemptions=None, kv_pct=None,
        kv_tokens: int | None = None, error: str = "") -> dict:
    base = {"index": index, "params": {"max_num_seqs": seqs}, "label": f"max_num_seqs={seqs}",
            "kv_cache_tokens": kv_tokens, "startup_s": 5.0}
    if req_s is None:
        return {**base, "status": "startup_failed", "exit_code": 2, "error": error, "result": None}
    result = {"request_throughput": req_s, "output_throughput": req_s * 128, "mean_ttft_ms": 10.0,
              "p99_ttft_ms": 20.0, "mean_e2el_ms": e2e_ms, "p99_e2el_ms": 2 * e2e_ms, "completed": 20, "failed": 0,
              "load_average_before": [0.5, 1.0, 1.0], "load_average_after": [1.25, 1.0, 1.0],
              "server_metrics": {"available": preemptions is not None, "num_preemptions": preemptions,
                                 "peak_kv_cache_usage_pct": kv_pct}}
    return {**base, "status": "ok", "exit_code": None, "error": "", "result": result}


W = resolve_workload("W1", num_prompts=20, max_concurrency=16)
AXES = parse_grid(["max_num_seqs=1,4,8,16"])


def test_advice_picks_the_smallest_value_within_2_percent_compute_bound():
    rows = [row(0, "16", 2.00, e2e_ms=900), row(1, "1", 0.50), row(2, "8", 1.99, e2e_ms=400), row(3, "4", 1.20)]
    assert [r["params"]["max_num_seqs"] for r in ordered(rows, AXES)] == ["1", "4", "8", "16"]
    text = advice(rows, AXES, W)
    assert text.startswith("Use max_num_seqs=8: 1.99 req/s, within 2% of the best (2.00 req/s at max_num_seqs=16)")
    assert "compute-bound" in text and "400 ms to 900 ms" in text


def test_advice_names_preemption_kv_and_client_limits():
    preempting = [row(0, "4", 1.0, preemptions=12.0), row(1, "8", 1.0, preemptions=30.0)]
    assert "preempting: 12 preemptions" in advice(preempting, AXES, W)
    kv_full = [row(0, "4", 1.0, preemptions=0.0, kv_pct=97.0), row(1, "8", 0.5)]
    assert "KV-bound: the KV cache peaked at 97% full" in advice(kv_full, AXES, W)
    small_cache = [row(0, "4", 1.0, kv_tokens=3000), row(1, "8", 1.0, kv_tokens=3000)]
    assert "about 4 requests of 640 tokens" in advice(small_cache, AXES, W)
    growing = [row(0, "2", 1.0, preemptions=7.0), row(1, "4", 1.5, preemptions=0.0, kv_pct=95.0),
               row(2, "8", 2.0, preemptions=0.0, kv_pct=20.0)]
    assert advice(growing, parse_grid(["max_num_seqs=2,4,8"]), W).endswith(
        "extend the grid. Smaller values are KV-bound: max_num_seqs=2 preempted 7 times; "
        "max_num_seqs=4 filled the KV cache.")
    capped = [row(0, "16", 1.0), row(1, "32", 1.0)]
    assert "client-bound" in advice(capped, parse_grid(["max_num_seqs=16,32"]), W)


def test_advice_for_choices_compares_them():
    def point(index, value, req_s, e2e_ms):
        return {**row(index, "8", req_s, e2e_ms=e2e_ms), "params": {"quantization": value},
                "label": f"quantization={value}"}
    axes = parse_grid(["quantization=default,fp8"])
    text = advice([point(0, "default", 1.5, 5000.0), point(1, "fp8", 0.5, 17000.0)], axes, W)
    assert text == ("Use quantization=default: 1.50 req/s, the best; against it, quantization=fp8 gives -67% "
                    "throughput at 17000 ms mean latency (here 5000).")


def test_advice_and_table_with_start_up_failures():
    message = "fitserve: The KV cache holds 32 tokens | fewer than --max-model-len 512."
    rows = [row(0, "1", None, error=message), row(1, "4", 1.5), row(2, "8", 1.2, preemptions=3.0, kv_tokens=6400)]
    assert advice(rows, AXES, W).endswith("(max_num_seqs=1 did not run: see the table.)")
    assert advice([rows[0]], AXES, W).startswith("No point completed a benchmark.")
    table = markdown_table(rows, AXES, W).splitlines()
    assert table[0].startswith("| max_num_seqs | Throughput (req/s) |") and len(table) == 5
    assert "start-up failed (exit 2): fitserve: The KV cache holds 32 tokens \\| fewer" in table[2]
    assert table[3].startswith("| 4 | 1.50 | 192.0 | 10 | 100 | 200 |") and table[3].endswith("| ok | best |")
    assert table[4].endswith("| 3 | - | 6400 | 10 | 5.0 | 0.5->1.2 | ok | -20%, preempting |")


def test_plots_are_written(tmp_path):
    rows = [row(0, "1", None, error="boom"), row(1, "4", 1.5), row(2, "8", 1.7)]
    names = plot_sweep(rows, AXES, W, tmp_path)
    assert names == ["sweep-throughput.png", "sweep-latency.png"]
    for name in names:
        assert (tmp_path / name).read_bytes()[:4] == PNG_MAGIC


def test_rerender_redoes_table_advice_and_plots_from_sweep_json(tmp_path, capsys):
    document = {"date": "2026-01-01T00:00:00+00:00", "command_line": "fitserve sweep ...", "commit": "abc",
                "dirty": False, "machine": {"cpu": "cpu", "num_cpus": 2, "gpus": []}, "server_command": "serve",
                "grid": {"max_num_seqs": ["1", "4"]}, "workload": W.to_json(), "metadata": {},
                "points": [row(0, "1", None, error="boom"), row(1, "4", 1.5)], "advice": "old", "table": "old"}
    (tmp_path / "sweep.json").write_text(json.dumps(document))
    assert main(["sweep", "--rerender", "--output-dir", str(tmp_path)]) == 0
    redone = json.loads((tmp_path / "sweep.json").read_text())
    assert redone["advice"].startswith("Use max_num_seqs=4: 1.50 req/s") and redone["commit"] == "abc"
    markdown = (tmp_path / "sweep.md").read_text()
    assert redone["rendered_by"]["command_line"] and "| 4 | 1.50 |" in markdown and "redone by" in markdown
    assert (tmp_path / "sweep-latency.png").exists() and "Use max_num_seqs=4" in capsys.readouterr().out
    assert main(["sweep", "--rerender", "--output-dir", str(tmp_path / "missing")]) == 2
    assert main(["sweep", "--output-dir", str(tmp_path)]) == 2  # no --grid
    assert "--grid is required" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_with_the_real_model_records_a_start_up_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", str(SRC))  # the servers run this checkout's code
    out = tmp_path / "sweep"
    rc = main(["sweep", "--grid", "max_model_len=100000,64", "--server-args", "--kv-cache-memory-bytes 16MiB",
               "--server-command", f"{sys.executable} -m fitserve serve", "--num-prompts", "2",
               "--input-len", "8", "--output-len", "3", "--disable-tqdm", "--output-dir", str(out)])
    assert rc == 0
    doc = json.loads((out / "sweep.json").read_text())
    failed, ok = doc["points"]
    assert failed["status"] == "startup_failed" and failed["exit_code"] == 2
    assert "--max-model-len 100000" in failed["error"] and failed["result"] is None
    assert ok["status"] == "ok" and ok["kv_cache_tokens"] > 0
    assert (ok["result"]["completed"], ok["result"]["total_output_tokens"]) == (2, 6)
    assert doc["advice"].startswith("Use max_model_len=64") and "commit" in doc and doc["command_line"]
    for name in ("sweep.md", "sweep-throughput.png", "sweep-latency.png", "server-0.log"):
        assert (out / name).exists(), name
    assert "start-up failed (exit 2)" in capsys.readouterr().out
