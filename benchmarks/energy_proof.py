"""GPU telemetry on a real card, end to end: `fitserve serve` (Llama-3-8B shape, dummy weights),
idle, then `fitserve bench` workloads, idle again, with /metrics scraped all along.

    python benchmarks/energy_proof.py --out $OUT            # W1, idle before and after
    python benchmarks/energy_proof.py --workloads W1 W2 --out $OUT

Writes energy_proof.json (the power timeline, median power per phase, each bench's energy
figures, the fitserve:gpu_* series the card gave and the telemetry log lines), server.log and
the benches' own JSON. FITSERVE_COMMIT names the commit where the copy has no .git.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fitserve.bench.server_metrics import parse_samples

MODEL_ARGS = ["--model", str(ROOT / "configs" / "llama-3-8b-instruct"), "--load-format", "dummy"]
SCRAPE_INTERVAL_S = 0.5
TIMELINE_SERIES = {  # key in the timeline -> sample name (summed over GPUs)
    "power_w": "fitserve:gpu_power_watts", "energy_j": "fitserve:gpu_energy_joules_total",
    "temperature_c": "fitserve:gpu_temperature_celsius", "sm_clock_mhz": "fitserve:gpu_sm_clock_mhz",
    "utilization_pct": "fitserve:gpu_utilization_percent", "running": "vllm:num_requests_running",
    "generation_tokens": "vllm:generation_tokens_total",
}
NVIDIA_SMI_FIELDS = "name,power.draw,power.limit,temperature.gpu,clocks.sm,clocks.max.sm,utilization.gpu," \
                    "clocks_event_reasons.active"


class Scraper(threading.Thread):
    """/metrics every SCRAPE_INTERVAL_S into a timeline; nvidia-smi beside it every 2 s, for comparison."""

    def __init__(self, url: str, start_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.start_s = url, start_s
        self.timeline: list[dict] = []
        self.nvidia_smi: list[dict] = []
        self.families: set[str] = set()
        self.last_text = ""
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5.0) as http:
            while not self.stop.wait(SCRAPE_INTERVAL_S):
                t = round(time.perf_counter() - self.start_s, 2)
                try:
                    text = http.get(self.url + "/metrics").text
                except httpx.HTTPError:
                    continue
                self.last_text = text
                samples = parse_samples(text)
                self.families |= {n for n in samples if n.startswith("fitserve:gpu")}
                self.timeline.append({"t_s": t, **{k: samples.get(n) for k, n in TIMELINE_SERIES.items()}})
                if len(self.timeline) % 4 == 0:
                    self.nvidia_smi.append({"t_s": t, "row": nvidia_smi()})


def nvidia_smi() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={NVIDIA_SMI_FIELDS}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or done.stderr.strip()


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode} during start-up (see server.log)")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become healthy in time")


def median_power(timeline: list[dict], t0: float, t1: float) -> float | None:
    values = [row["power_w"] for row in timeline if t0 <= row["t_s"] <= t1 and row["power_w"] is not None]
    return statistics.median(values) if values else None


ENERGY_KEYS = ("completed", "failed", "duration", "total_output_tokens", "output_throughput", "request_throughput",
               "median_ttft_ms", "median_tpot_ms", "energy_j", "mean_power_w", "joules_per_output_token",
               "output_tokens_per_joule")


def run_bench(url: str, workload: str, out: Path, commit: str, extra: list[str]) -> dict:
    path = out / f"bench-{workload}.json"
    cmd = [sys.executable, "-m", "fitserve.cli", "bench", "--base-url", url, "--workload", workload, "--disable-tqdm",
           "--save-result", str(path), *extra, "--metadata", f"commit={commit}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, check=False)
    print(done.stdout[-4000:], done.stderr[-2000:], flush=True)
    if not path.exists():
        return {"workload": workload, "error": done.stderr[-2000:]}
    result = json.loads(path.read_text())
    return {"workload": workload, **{k: result.get(k) for k in ENERGY_KEYS},
            "server_metrics": result["server_metrics"], "command": " ".join(["fitserve", *cmd[3:]])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workloads", nargs="+", default=["W1"])
    parser.add_argument("--idle-s", type=float, default=8.0)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--server-args", default=None, help="instead of the Llama-3-8B dummy model (a CPU dry run)")
    parser.add_argument("--bench-args", default="", help="more `fitserve bench` flags (a CPU dry run)")
    args = parser.parse_args()
    model_args = MODEL_ARGS if args.server_args is None else shlex.split(args.server_args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = os.environ.get("FITSERVE_COMMIT", "unknown")
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    serve_cmd = [sys.executable, "-m", "fitserve.cli", "serve", *model_args, "--port", str(args.port)]
    log = (out / "server.log").open("w")
    server = subprocess.Popen(serve_cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    start_s = time.perf_counter()
    phases: list[dict] = []

    def now() -> float:
        return round(time.perf_counter() - start_s, 2)

    try:
        startup_s = wait_healthy(url, server, timeout_s=300)
        scraper = Scraper(url, start_s)
        scraper.start()
        t0 = now()
        time.sleep(args.idle_s)
        phases.append({"phase": "idle before", "t0_s": t0, "t1_s": now()})
        benches = []
        for workload in args.workloads:
            t0 = now()
            benches.append(run_bench(url, workload, out, commit, shlex.split(args.bench_args)))
            phases.append({"phase": f"bench {workload}", "t0_s": t0, "t1_s": now()})
            t0 = now()
            time.sleep(args.idle_s)
            phases.append({"phase": f"idle after {workload}", "t0_s": t0, "t1_s": now()})
        scraper.stop.set()
        scraper.join()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    for phase in phases:
        phase["median_power_w"] = median_power(scraper.timeline, phase["t0_s"], phase["t1_s"])
    server_log = (out / "server.log").read_text(errors="replace").splitlines()
    gpu_lines = [line for line in scraper.last_text.splitlines() if line.startswith("fitserve:gpu_info")]
    document = {
        "commit": commit,
        "command": "python benchmarks/energy_proof.py " + " ".join(sys.argv[1:]),
        "server_command": shlex.join(["fitserve", "serve", *(a.replace(str(ROOT) + "/", "") for a in model_args)]),
        "startup_s": startup_s,
        "gpu_info": gpu_lines,
        "gpu_series_exported": sorted(scraper.families),
        "phases": phases,
        "benches": benches,
        "telemetry_log": [line for line in server_log if "fitserve.telemetry" in line],
        "nvidia_smi": {"fields": NVIDIA_SMI_FIELDS, "rows": scraper.nvidia_smi},
        "last_gpu_scrape": [line for line in scraper.last_text.splitlines() if line.startswith("fitserve:gpu")],
        "timeline": scraper.timeline,
    }
    (out / "energy_proof.json").write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps({k: document[k] for k in ("phases", "benches", "gpu_series_exported", "telemetry_log")},
                     indent=1)[:8000])


if __name__ == "__main__":
    main()
