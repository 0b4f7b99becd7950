"""The long soak, run by hand, on the real default model (SmolLM2-135M-Instruct):

    .venv/bin/python benchmarks/soak.py                 # 10,000 requests of the issue's mix, then the clean baseline
    .venv/bin/python benchmarks/soak.py --num-requests 300 --out /tmp/soak.json   # a quick look
    .venv/bin/python benchmarks/soak.py --mix clean     # the clean baseline alone

Mixes (benchmarks/soak_traffic.py): "issue" (10% disconnects mid-stream, 5% malformed bodies, 1%
oversized, 2% slow readers, the rest valid), "default" (every hostile kind, as tests/test_soak.py)
and "clean" (valid only). Unless --no-baseline, the clean soak of as many requests runs after the
mixed one on the same server, and the JSON compares the valid requests' p99 latency of the two.
Each run reports 5xx answers, hangs (no answer within --hang-timeout), unexpected answers, and the
engine afterwards: requests left, invariants, KV blocks not back in the free pool.

The server runs in this process, with `fitserve serve`'s own HTTP settings (server/launcher.py:
connection guard, timeouts), so that afterwards the engine's invariants and free KV
blocks can be checked directly, on 127.0.0.1; the traffic (benchmarks/soak_traffic.py) comes
from a separate process, so its own work does not slow the server. Valid requests are greedy
and their expected answers are learnt from solo runs before the soak; float32 by default,
because in bfloat16 batching changes rounding enough to flip near-tied greedy choices.
Writes the summary JSON (--out) and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from soak_traffic import (  # noqa: E402
    MIXES,
    SoakSettings,
    ValidRequest,
    learn_expected,
    plan_requests,
    run_soak,
    summarize,
)

PROMPTS = ["The capital of France is", "Once upon a time", "The three primary colors are", "Water boils at",
           "def fibonacci(n):", "The largest planet in the solar system is", "My favourite food is",
           "In 1969, astronauts"]
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2+2?", "Write a haiku about snow.",
             "Who wrote Hamlet?", "What do bees make?", "How many legs does a spider have?", "What color is the sky?"]
VALID_MAX_TOKENS = 8  # short requests: 10,000 of them take minutes on two cores
DRAIN_WAIT_S = 120.0  # after the soak, how long aborted requests may take to leave the engine


def valid_requests(max_tokens: int = VALID_MAX_TOKENS) -> list[ValidRequest]:
    requests = [ValidRequest("/v1/completions", {"prompt": p, "max_tokens": max_tokens, "temperature": 0})
                for p in PROMPTS]
    requests += [ValidRequest("/v1/chat/completions", {"messages": [{"role": "user", "content": q}],
                                                        "max_tokens": max_tokens, "temperature": 0})
                 for q in QUESTIONS]
    return requests


def drive(url: str, settings: SoakSettings, max_tokens: int, results: Any) -> None:
    """The client process: learn the expected answers alone, then send the soak."""
    valid = asyncio.run(learn_expected(url, valid_requests(max_tokens)))
    plan = plan_requests(settings, valid)
    outcome, wall_s = asyncio.run(run_soak(url, plan, settings))
    results.put(summarize(outcome, wall_s))


def start_server(app: Any, config: Any) -> tuple[str, Any, threading.Thread]:
    from fitserve.server.launcher import build_server

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # build_server binds it again (a race with another process is harmless here)
    server = build_server(app, "127.0.0.1", port, app.state.lifecycle, config, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def soak_once(url: str, settings: SoakSettings, max_tokens: int, engine: Any) -> dict[str, Any]:
    """One soak from a separate client process, then /health and the engine's state."""
    import httpx

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    client = context.Process(target=drive, args=(url, settings, max_tokens, results))
    client.start()
    summary = results.get()
    client.join()
    summary["mix"] = settings.mix
    summary["health_after"] = httpx.get(f"{url}/health").status_code
    summary["engine_after"] = engine_report(engine)
    return summary


def engine_report(engine: Any) -> dict[str, Any]:
    """After the soak: requests left, invariants, KV blocks not back in the free pool."""
    core = engine.engine
    deadline = time.monotonic() + DRAIN_WAIT_S
    while core.has_unfinished and time.monotonic() < deadline:
        time.sleep(0.1)
    core.check_invariants()
    pool = core.kv_cache.pool
    return {"requests_left": len(core.scheduler.requests), "invariants": "ok",
            "kv_blocks_total": pool.num_blocks, "kv_blocks_leaked": pool.num_blocks - core.kv_cache.num_free_blocks,
            "num_preemptions": core.scheduler.num_preemptions_total, "engine_healthy": engine.is_healthy()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=10_000)
    parser.add_argument("--mix", default="issue", choices=sorted(MIXES), help="the traffic (soak_traffic.MIXES)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the clean soak that follows the mixed one")
    parser.add_argument("--max-tokens", type=int, default=VALID_MAX_TOKENS, help="max_tokens of the valid requests")
    parser.add_argument("--hang-timeout", type=float, default=120.0, help="no answer within this long: a hang")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--request-timeout", type=float, default=120.0,
                        help="the server's --request-timeout (the default mix's server_timeout kind needs a long "
                             "--long-tokens to pass it; on a busy 2-core machine 30 s cuts valid requests)")
    parser.add_argument("--client-timeout", type=float, default=3.0, help="the client_timeout kind's patience")
    parser.add_argument("--long-tokens", type=int, default=64,
                        help="max_tokens of the long requests (dropped, timed out), still running when left")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak_real.json"))
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    import torch

    from fitserve.config import EngineConfig, SchedulerConfig, ServerConfig
    from fitserve.engine.async_engine import AsyncEngine
    from fitserve.startup import build_engine
    from fitserve.server.app import build_app

    built = build_engine(EngineConfig(dtype=args.dtype, scheduler=SchedulerConfig(max_model_len=args.max_model_len)),
                         progress=False)
    engine = AsyncEngine(built.engine, built.model_name, built.tokenizer).start()
    server_config = ServerConfig(request_timeout_s=args.request_timeout, max_request_body_bytes=2**20)
    url, server, thread = start_server(build_app(engine, config=server_config), server_config)
    mixes = [args.mix] if args.no_baseline or args.mix == "clean" else [args.mix, "clean"]
    runs = {}
    for mix in mixes:
        settings = SoakSettings(
            num_requests=args.num_requests, concurrency=args.concurrency, max_model_len=args.max_model_len,
            max_request_body_bytes=server_config.max_request_body_bytes, client_timeout_s=args.client_timeout,
            long_body={"prompt": "Write a very long story about a dragon.", "max_tokens": args.long_tokens,
                       "ignore_eos": True, "temperature": 0}, seed=args.seed, mix=mix, hang_timeout_s=args.hang_timeout,
        )
        runs[mix] = soak_once(url, settings, args.max_tokens, engine)
    server.should_exit = True
    thread.join(30)
    engine.shutdown()
    summary: dict[str, Any] = {"runs": runs, "comparison": compare(runs, args.mix)}
    summary["settings"] = {**vars(args), "model": built.model_name, "kv_cache_tokens": built.engine.kv_cache.pool.num_blocks
                           * built.engine.block_size, "max_num_seqs": built.engine.limits.scheduler.max_num_seqs}
    summary["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "device": "cpu", "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    ok = all(run["num_5xx"] == 0 and run["num_unexpected"] == 0 and run["num_hangs"] == 0
             and run["engine_after"]["kv_blocks_leaked"] == 0 for run in runs.values())
    return 0 if ok else 1


def compare(runs: dict[str, dict[str, Any]], mix: str) -> dict[str, Any] | None:
    """The valid requests' latency under the mixed traffic against the clean baseline."""
    if mix not in runs or "clean" not in runs or mix == "clean":
        return None
    mixed, clean = runs[mix]["valid"], runs["clean"]["valid"]
    return {"valid_p99_s": {"mixed": mixed["latency_p99_s"], "clean": clean["latency_p99_s"]},
            "valid_p50_s": {"mixed": mixed["latency_p50_s"], "clean": clean["latency_p50_s"]},
            "p99_ratio_mixed_over_clean": round(mixed["latency_p99_s"] / clean["latency_p99_s"], 3)
            if clean["latency_p99_s"] else None}


if __name__ == "__main__":
    sys.exit(main())
