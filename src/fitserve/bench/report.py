"""The benchmark's outputs: a table for people, a JSON document for machines, and the
provenance BENCHMARKS.md asks of every number (command line, commit, machine, card)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import fitserve
from fitserve.bench.stats import LatencyStats, percentile_word

RESULT_FORMAT_VERSION = 1
PACKAGES_REPORTED = ("fitserve", "torch", "triton", "vllm")  # versions read from metadata, never imported
DEVICE_KEYS = ("device_name", "card", "gpu", "device")     # where a server's /version may name its card
SUBPROCESS_TIMEOUT_S = 10.0
MAX_DIRTY_FILES_LISTED = 50
TABLE_WIDTH = 56


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> dict:
    """The commit of the checkout fitserve runs from, and the tracked files that differ from it
    (a shared checkout often has others' work in progress: the record names it)."""
    root = str(Path(fitserve.__file__).resolve().parents[2])
    commit = _run(["git", "-C", root, "rev-parse", "HEAD"])
    if commit is None:
        return {"commit": None, "dirty": None, "dirty_files": []}
    changed = (_run(["git", "-C", root, "diff", "--name-only", "HEAD"]) or "").split()
    return {"commit": commit, "dirty": bool(changed), "dirty_files": changed[:MAX_DIRTY_FILES_LISTED]}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return [line.strip() for line in (out or "").splitlines() if line.strip()]


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES_REPORTED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict:
    """The client's machine (the server's too when it runs here, as on our CPU runs)."""
    return {
        "cpu": cpu_name(),
        "num_cpus": os.cpu_count(),
        "gpus": gpu_names(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: how busy the machine was, for the record."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def device_name(server_version: dict | None) -> str | None:
    if not isinstance(server_version, dict):
        return None
    return next((str(server_version[k]) for k in DEVICE_KEYS if server_version.get(k)), None)


def provenance(argv: list[str] | None = None) -> dict:
    return {
        "format_version": RESULT_FORMAT_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command_line": shlex.join(argv if argv is not None else ["fitserve", *sys.argv[1:]]),
        **git_commit(),
        "machine": machine_info(),
    }


def save_json(path: str | Path, document: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _line(label: str, value) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.2f}"
    else:
        text = str(value)
    return f"{label:<40} {text}"


def _latency_lines(title: str, short: str, stats: LatencyStats | None) -> list[str]:
    lines = [f"{' ' + title + ' ':-^{TABLE_WIDTH}}"]
    if stats is None:
        return [*lines, _line(f"{short}:", None)]
    lines += [_line(f"Mean {short} (ms):", stats.mean_ms), _line(f"Median {short} (ms):", stats.median_ms)]
    lines += [_line(f"P{percentile_word(p)} {short} (ms):", v) for p, v in stats.percentiles_ms]
    return lines


def format_table(result: dict, latencies: dict[str, LatencyStats | None]) -> str:
    """The people's view of a result: vLLM's layout, plus the server's /metrics and W5's figures."""
    w = result["workload"]
    lines = [f"{' Serving Benchmark Result ':=^{TABLE_WIDTH}}",
             _line("Workload:", f"{w['name']} ({w['description']})"),
             _line("Successful requests:", result["completed"]), _line("Failed requests:", result["failed"]),
             _line("Maximum request concurrency:", w["max_concurrency"]),
             _line("Request rate configured (RPS):", w["request_rate"]),
             _line("Benchmark duration (s):", result["duration"]),
             _line("Total input tokens:", result["total_input_tokens"]),
             _line("Total generated tokens:", result["total_output_tokens"]),
             _line("Request throughput (req/s):", result["request_throughput"]),
             *([_line("Request goodput (req/s):", result["request_goodput"])]
               if result.get("request_goodput") is not None else []),
             _line("Output token throughput (tok/s):", result["output_throughput"]),
             _line("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"]),
             _line("Peak concurrent requests:", result["max_concurrent_requests"]),
             _line("Total token throughput (tok/s):", result["total_token_throughput"])]
    titles = {"ttft": ("Time to First Token", "TTFT"), "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
              "itl": ("Inter-token Latency", "ITL"), "e2el": ("End-to-end Latency", "E2EL")}
    for name, (title, short) in titles.items():
        lines += _latency_lines(title, short, latencies[name])
    lines += _server_lines(result["server_metrics"]) + _energy_lines(result) + _client_lines(result.get("client_cpu"))
    if result.get("interference"):
        lines += _interference_lines(result["interference"])
    for error, count in result["errors"].items():
        lines.append(f"failed x{count}: {error}")
    lines.append("=" * TABLE_WIDTH)
    return "\n".join(lines)


def _client_lines(cpu: dict | None) -> list[str]:
    """The benchmark client's own CPU use (bench/client_processes.py): a busy client may be the limit."""
    if not cpu:
        return []
    return [f"{' Benchmark client ':-^{TABLE_WIDTH}}", _line("Client processes:", cpu["num_processes"]),
            _line("Busiest client CPU (% of a core):", round(100 * cpu["max_core_fraction"], 1))]


def _server_lines(server: dict) -> list[str]:
    lines = [f"{' Server /metrics ':-^{TABLE_WIDTH}}"]
    if not server["available"]:
        return [*lines, "(the server has no /metrics)"]
    return lines + [_line("Preemptions during the run:", server["num_preemptions"]),
                    _line("Peak KV-cache usage (%):", server["peak_kv_cache_usage_pct"]),
                    _line("Peak requests waiting:", server["peak_num_requests_waiting"]),
                    _line("Peak requests running:", server["peak_num_requests_running"]),
                    *_prefix_cache_lines(server), *_server_latency_lines(server)]


def _server_latency_lines(server: dict) -> list[str]:
    """The server's TTFT, queue and prefill means (arrival at its API onwards): the client's mean TTFT
    less the server's is what HTTP and the client add."""
    if server.get("mean_server_ttft_ms") is None:
        return []
    return [_line("Server mean TTFT (ms):", server["mean_server_ttft_ms"]),
            _line("Server mean queue time (ms):", server.get("mean_queue_time_ms")),
            _line("Server mean prefill time (ms):", server.get("mean_prefill_time_ms"))]


def _prefix_cache_lines(server: dict) -> list[str]:
    """vllm:prefix_cache_* during the run; nothing for a server without them or with caching off."""
    if not server.get("prefix_cache_queries"):
        return []
    return [_line("Prefix cache queries (tokens):", int(server["prefix_cache_queries"])),
            _line("Prefix cache hits (tokens):", int(server["prefix_cache_hits"] or 0)),
            _line("Prefix cache hit rate (%):", server.get("prefix_cache_hit_rate_pct"))]


def _energy_lines(result: dict) -> list[str]:
    """The GPUs' energy during the run, from fitserve's fitserve:gpu_* series (docs/telemetry.md)."""
    server = result["server_metrics"]
    if result.get("energy_j") is None:
        return []
    return [f"{' GPU energy (server /metrics) ':-^{TABLE_WIDTH}}",
            _line("Power before the run (W):", server.get("power_before_w")),
            _line("Peak power (W):", server.get("peak_power_w")),
            _line("Mean power during the run (W):", result.get("mean_power_w")),
            _line(f"Energy, from the {server.get('energy_source')} (J):", result["energy_j"]),
            _line("Joules per output token:", _significant(result.get("joules_per_output_token"))),
            _line("Output tokens per joule:", _significant(result.get("output_tokens_per_joule")))]


def _significant(value: float | None) -> str | None:
    """Four significant digits: joules per token are often well under 1."""
    return None if value is None else f"{value:.4g}"


def _interference_lines(w5: dict) -> list[str]:
    return [f"{' W5: short requests while the long one streams ':-^{TABLE_WIDTH}}",
            _line("Long request TTFT (ms):", w5.get("long_ttft_ms")),
            _line("Long request E2EL (ms):", w5.get("long_e2el_ms")),
            _line("Short requests completed:", f"{w5['num_short_completed']} / {w5['num_short']}"),
            _line("Short requests done before the long one:", w5.get("num_short_done_before_long")),
            _line("Short mean TTFT (ms):", w5.get("mean_short_ttft_ms")),
            _line("Short P99 TTFT (ms):", w5.get("p99_short_ttft_ms")),
            _line("Short mean E2EL (ms):", w5.get("mean_short_e2el_ms")),
            _line("Short P99 E2EL (ms):", w5.get("p99_short_e2el_ms"))]
