"""The benchmark of record through HTTP, in one device call: `fitserve serve` (Llama-3-8B shape,
dummy bf16 weights, default flags) driven by `fitserve bench` for W1, W2, W4 and a single stream,
with --api-server-count 1, 2 and 4, beside the in-process figure of the same workloads
(benchmarks/gpu_bench.py) and each workload's floor from the card's measured ceilings.

    PYTHONPATH=<carried wheels> python benchmarks/http_record.py --out $OUT
    ... http_record.py --model-config configs/gemma-3-12b-it --workloads W1 W2 --api-server-counts 1 --out $OUT

Each workload is sent as gpu_bench.py runs it (fixed prompt and output lengths, token-id prompts,
ignore_eos, a closed loop of `concurrency` requests), spread over --client-processes benchmark
processes (at most one per stream), whose CPU use is recorded so a client-bound run shows, as is
each server process's (main: the API process with one, the supervisor with several; core; api1...:
a core or API process near 1.0 of a core is the limit).
Writes to --out: http_record.jsonl (one line per mode and workload), http_record.md (the table),
bench_results.json (every `fitserve bench` result), logs.txt (the servers' and parts' logs).
Budget: about 20 s of ceilings, 90 s in-process, 100 s per server (start-up included) on an H200;
a server whose estimated end lies past --budget-s is skipped and recorded as skipped.

`--smoke` shrinks every workload to a few tiny requests and skips the GPU parts without CUDA,
to check the script on a CPU with `--serve-flags '--model DIR --device cpu ...'`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_floors import prompt_seed  # noqa: E402
from fitserve.bench.server_process import ServerProcess, free_port  # noqa: E402

GPU_BENCH = ROOT / "benchmarks" / "gpu_bench.py"
CONFIG_DIR = ROOT / "configs" / "llama-3-8b-instruct"
# id: (requests, concurrency, prompt tokens, output tokens): gpu_bench.py's WORKLOADS
WORKLOADS = {"W1": (100, 20, 512, 128), "W2": (1000, 256, 512, 128), "W4": (200, 64, 128, 1024),
             "single": (1, 1, 512, 256)}
SMOKE_WORKLOAD = (4, 2, 16, 4)
START_TIMEOUT_S = 300.0
SERVER_TTFT_KEYS = ("mean_server_ttft_ms", "mean_queue_time_ms", "mean_prefill_time_ms")  # bench's server_metrics
ALL_READY_CONNECTIONS = 20  # /health answered 200 on this many new connections in a row: every API process is up
SERVER_ESTIMATE_S = 100.0  # one server's start-up and the four workloads on an H200


def child_env() -> dict[str, str]:
    """The children find fitserve's source and the carried wheels (PYTHONPATH as given)."""
    paths = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "TQDM_DISABLE": "1"}


def run_json(command: list[str], timeout_s: float, logs: list[str], label: str) -> dict:
    """Run a command whose last stdout line is JSON; its failure becomes {"error": ...}."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=child_env())
    except subprocess.TimeoutExpired:
        return {"error": f"{label}: timed out after {timeout_s:.0f} s"}
    logs.append(f"== {label} (exit {done.returncode})\n{done.stderr[-4000:]}")
    if done.returncode != 0:
        return {"error": f"{label}: exit code {done.returncode}", "stderr_tail": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def floors(ceilings: dict, workloads: list[str], model_config: Path) -> dict[str, float]:
    import bench_floors

    model = bench_floors.model_figures(model_config, "bf16")
    return {w: bench_floors.floor_s(w, ceilings, model) for w in workloads}


def in_process(workloads: list[str], model_config: Path, logs: list[str]) -> dict:
    """gpu_bench.py's fitserve part: the engine driven without HTTP, default flags."""
    part = run_json([sys.executable, str(GPU_BENCH), "fitserve", "--model-config", str(model_config),
                     "--workloads", *workloads], 280, logs, "in-process")
    return part.get("runs", part)


def wait_all_ready(base_url: str, timeout_s: float) -> bool:
    import httpx

    deadline, in_a_row = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        try:
            ok = httpx.get(base_url + "/health", timeout=5).status_code == 200  # a new connection each time
        except httpx.TransportError:
            ok = False
        in_a_row = in_a_row + 1 if ok else 0
        if in_a_row >= ALL_READY_CONNECTIONS:
            return True
        time.sleep(0.05)
    return False


def server_cpu_ticks(session_id: int) -> dict[int, tuple[str, int]]:
    """{pid: (role, user + system clock ticks)} of the server's processes (its own session): the
    started process "main", then its spawned children by pid: the core first (it is started before
    the API processes), then "api1", "api2", ... (multiprocessing's resource tracker left out)."""
    found: dict[int, tuple[bytes, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[3]) == session_id and b"resource_tracker" not in cmdline:  # fields[3]: the session id
            found[int(entry)] = (cmdline, int(fields[11]) + int(fields[12]))  # utime + stime
    children = sorted(pid for pid, (cmdline, _) in found.items() if b"spawn_main" in cmdline)
    roles = {session_id: "main", **{pid: "core" if i == 0 else f"api{i}" for i, pid in enumerate(children)}}
    return {pid: (roles.get(pid, "other"), ticks) for pid, (_, ticks) in found.items()}


def server_cpu(before: dict, after: dict, duration_s: float) -> dict[str, float]:
    """Each server process's CPU use over a run, as a fraction of one core."""
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    return {role: round((ticks - before.get(pid, (role, 0))[1]) / ticks_per_s / duration_s, 3)
            for pid, (role, ticks) in sorted(after.items(), key=lambda item: item[1][0])}


def bench_one(base_url: str, name: str, shape: tuple[int, int, int, int], client_processes: int,
              bench_flags: list[str], out: Path, logs: list[str], server_pid: int | None = None,
              seed: int = 0) -> dict:
    requests, concurrency, prompt, output = shape
    path = out / f"bench-{name}.json"
    command = [sys.executable, "-m", "fitserve", "bench", "--base-url", base_url, "--workload", "custom",
               "--num-prompts", str(requests), "--max-concurrency", str(concurrency), "--input-len", str(prompt),
               "--output-len", str(output), "--client-processes", str(max(1, min(client_processes, concurrency))),
               "--disable-tqdm", "--metric-percentiles", "50,99", "--seed", str(seed), "--save-result", str(path),
               *bench_flags]
    cpu_before = server_cpu_ticks(server_pid) if server_pid else {}
    done = subprocess.run(command, capture_output=True, text=True, env=child_env())
    cpu_after = server_cpu_ticks(server_pid) if server_pid else {}
    logs.append(f"== bench {name} (exit {done.returncode})\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    if done.returncode != 0:
        return {"error": f"bench exit code {done.returncode}", "stderr_tail": done.stderr[-1500:]}
    result = json.loads(path.read_text())
    path.unlink()
    result["server_cpu"] = server_cpu(cpu_before, cpu_after, result["duration"]) if cpu_after else {}
    return result


def through_http(count: int, shapes: dict, serve_flags: list[str], client_processes: int, bench_flags: list[str],
                 out: Path, logs: list[str], repeats: int = 1) -> dict[str, dict]:
    """One `fitserve serve --api-server-count count`, every workload through it `repeats` times in a row;
    a workload's result is its run of median duration, with every run's duration in "durations_s"."""
    port = free_port()
    log_path = out / f"serve-api{count}.log"
    server = ServerProcess([sys.executable, "-m", "fitserve", "serve", "--port", str(port), "--log-level", "warning",
                            "--disable-log-stats", "--api-server-count", str(count), *serve_flags], log_path, port)
    os.environ.update(child_env())  # ServerProcess starts the server with this process's environment
    started = server.start(START_TIMEOUT_S)
    results: dict[str, dict] = {}
    try:
        if not started.ready or not wait_all_ready(server.base_url, START_TIMEOUT_S):
            return {name: {"error": started.error or "not every API process became ready"} for name in shapes}
        for name, shape in shapes.items():
            # A seed per workload and run: no run finds an earlier one's prompts in the prefix cache.
            runs = [bench_one(server.base_url, f"api{count}-{name}", shape, client_processes, bench_flags,
                              out, logs, server.process.pid if server.process else None,
                              seed=prompt_seed(name, repeat)) for repeat in range(repeats)]
            failed = [run for run in runs if "error" in run]
            if failed:
                results[name] = failed[0]
                continue
            runs.sort(key=lambda run: run["duration"])
            results[name] = {**runs[len(runs) // 2], "durations_s": [round(run["duration"], 3) for run in runs]}
            results[name]["server_startup_s"] = started.startup_s
    finally:
        server.stop()
        logs.append(f"== serve --api-server-count {count}\n{log_path.read_text()[-6000:]}")
        log_path.unlink(missing_ok=True)
    return results


def http_line(mode: str, name: str, result: dict, floor: float | None) -> dict:
    if "error" in result:
        return {"mode": mode, "workload": name, **result}
    duration = result["duration"]
    cpu = result.get("client_cpu") or {}
    server = result.get("server_metrics") or {}
    return {"mode": mode, "workload": name, "duration_s": round(duration, 3), "floor_s": floor,
            "of_floor_pct": round(100 * floor / duration, 1) if floor else None,
            "completed": result["completed"], "failed": result["failed"],
            "durations_s": result.get("durations_s"),
            "median_ttft_ms": round(result["median_ttft_ms"], 1), "p99_itl_ms": round(result["p99_itl_ms"], 1),
            "mean_tpot_ms": round(result["mean_tpot_ms"], 2), "mean_ttft_ms": round(result["mean_ttft_ms"], 1),
            **{key: _round(server.get(key)) for key in SERVER_TTFT_KEYS},
            "client_processes": cpu.get("num_processes"), "client_max_core_fraction": cpu.get("max_core_fraction"),
            "client_bound": cpu.get("client_bound"), "server_cpu_core_fraction": result.get("server_cpu")}


def in_process_line(name: str, run: dict, floor: float | None) -> dict:
    if "duration_s" not in run:
        return {"mode": "in_process", "workload": name, "error": run.get("error", "no run")}
    duration = run["duration_s"]
    return {"mode": "in_process", "workload": name, "duration_s": round(duration, 3), "floor_s": floor,
            "of_floor_pct": round(100 * floor / duration, 1) if floor else None,
            "median_ttft_ms": round(run["ttft_ms"]["median"], 1), "p99_itl_ms": round(run["itl_p99_ms"], 1),
            "mean_tpot_ms": round(run["tpot_ms"]["mean"], 2), "mean_ttft_ms": round(run["ttft_ms"]["mean"], 1)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def ttft_table(lines: list[dict], workloads: list[str], modes: list[str]) -> str:
    """Where the first token's time goes: the client's mean TTFT against the server's (arrival at its
    API to the token sampled), split into queue (to the step that first schedules it) and prefill."""
    rows = ["| workload | mode | mean TTFT, client | server | queue | prefill | client - server |",
            "|---|---|---:|---:|---:|---:|---:|"]
    by_key = {(line["mode"], line["workload"]): line for line in lines}
    for name in workloads:
        for mode in modes:
            line = by_key.get((mode, name), {})
            if line.get("mean_ttft_ms") is None:
                continue
            server = line.get("mean_server_ttft_ms")
            cells = [line["mean_ttft_ms"], server, line.get("mean_queue_time_ms"), line.get("mean_prefill_time_ms"),
                     None if server is None else round(line["mean_ttft_ms"] - server, 1)]
            rows.append(f"| {name} | {mode} | " + " | ".join("-" if c is None else f"{c:.1f} ms" for c in cells) + " |")
    return "\n".join(rows)


def table(lines: list[dict], workloads: list[str], modes: list[str]) -> str:
    header = "| workload | floor (s) | " + " | ".join(f"{m}: s, % of floor, TTFT med, ITL p99" for m in modes) + " |"
    rows = [header, "|" + "---|" * (2 + len(modes))]
    by_key = {(line["mode"], line["workload"]): line for line in lines}
    for name in workloads:
        floor = next((line.get("floor_s") for line in lines if line["workload"] == name and line.get("floor_s")), None)
        cells = []
        for mode in modes:
            line = by_key.get((mode, name), {"error": "not run"})
            if "duration_s" not in line:
                cells.append(str(line.get("error", line.get("skipped", "-")))[:40])
                continue
            pct = f"{line['of_floor_pct']}%" if line.get("of_floor_pct") is not None else "-"
            bound = " (client-bound)" if line.get("client_bound") else ""
            runs = line.get("durations_s") or []
            spread = f" (runs {', '.join(f'{d:.2f}' for d in runs)} s)" if len(runs) > 1 else ""
            cells.append(f"{line['duration_s']:.2f} s{spread}, {pct}, {line['median_ttft_ms']:.0f} ms, "
                         f"{line['p99_itl_ms']:.0f} ms{bound}")
        rows.append(f"| {name} | {floor:.2f} | " if floor else f"| {name} | - | ")
        rows[-1] += " | ".join(cells) + " |"
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", f"benchmarks/results/http-{int(time.time())}")))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--api-server-counts", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--client-processes", type=int, default=4, help="fitserve bench's, at most one per stream")
    parser.add_argument("--model-config", type=Path, default=CONFIG_DIR,
                        help="a config folder (configs/): its shape is served, run in-process and floored")
    parser.add_argument("--serve-flags", default=None,
                        help="fitserve serve's flags besides --port and --api-server-count "
                             "(default: --model MODEL_CONFIG --load-format dummy)")
    parser.add_argument("--bench-flags", default="", help="more `fitserve bench` flags (e.g. --vocab-size 300)")
    parser.add_argument("--budget-s", type=float, default=510.0,
                        help="a server is skipped when its estimated end would come later than this")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each workload through one server, one after another; the median is reported")
    parser.add_argument("--smoke", action="store_true", help="tiny workloads; GPU parts skipped without CUDA")
    args = parser.parse_args()
    if args.serve_flags is None:
        args.serve_flags = f"--model {args.model_config} --load-format dummy"
    start_s = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    logs: list[str] = []
    shapes = {name: SMOKE_WORKLOAD if args.smoke else WORKLOADS[name] for name in args.workloads}
    cuda = _has_cuda()
    ceilings = run_json([sys.executable, str(GPU_BENCH), "ceilings"], 120, logs, "ceilings") if cuda else {}
    floor = floors(ceilings, args.workloads, args.model_config) if "copy_bytes_per_s" in ceilings and not args.smoke else {}
    lines = []
    runs = in_process(args.workloads, args.model_config, logs) if cuda and not args.smoke else {}
    for name in args.workloads:
        lines.append(in_process_line(name, runs.get(name, runs), floor.get(name)))
    results: dict[str, dict] = {}
    for count in args.api_server_counts:
        mode = f"http_api{count}"
        if time.monotonic() - start_s + SERVER_ESTIMATE_S > args.budget_s:
            lines += [{"mode": mode, "workload": name, "skipped": "time budget"} for name in args.workloads]
            continue
        results[mode] = through_http(count, shapes, shlex.split(args.serve_flags), args.client_processes,
                                     shlex.split(args.bench_flags), args.out, logs, args.repeats)
        lines += [http_line(mode, name, results[mode][name], floor.get(name)) for name in args.workloads]
    document = {"ceilings": ceilings, "floors_s": floor, "elapsed_s": round(time.monotonic() - start_s, 1)}
    with open(args.out / "http_record.jsonl", "w") as handle:
        for line in [document, *lines]:
            handle.write(json.dumps(line) + "\n")
            print(json.dumps(line), flush=True)
    (args.out / "bench_results.json").write_text(json.dumps(results, indent=1))
    (args.out / "logs.txt").write_text("\n".join(logs))
    modes = ["in_process", *(f"http_api{c}" for c in args.api_server_counts)]
    rendered = table(lines, args.workloads, modes) + "\n\n" + ttft_table(lines, args.workloads, modes)
    (args.out / "http_record.md").write_text(rendered + "\n")
    print(rendered)
    return 0 if all("error" not in line for line in lines) else 1


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
