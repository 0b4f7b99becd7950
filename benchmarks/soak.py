"""The long soak, run by hand, on the real default model (SmolLM2-135M-Instruct):

    .venv/bin/python benchmarks/soak.py                 # 1,200 requests at concurrency 64
    .venv/bin/python benchmarks/soak.py --num-requests 200 --out /tmp/soak.json   # a quick look

The server runs in this process (so that afterwards the engine's invariants and free KV
blocks can be checked directly) on 127.0.0.1; the traffic (benchmarks/soak_traffic.py) comes
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

from soak_traffic import SoakSettings, ValidRequest, learn_expected, plan_requests, run_soak, summarize  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time", "The three primary colors are", "Water boils at",
           "def fibonacci(n):", "The largest planet in the solar system is", "My favourite food is",
           "In 1969, astronauts"]
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2+2?", "Write a haiku about snow.",
             "Who wrote Hamlet?", "What do bees make?", "How many legs does a spider have?", "What color is the sky?"]
VALID_MAX_TOKENS = 12
DRAIN_WAIT_S = 120.0  # after the soak, how long aborted requests may take to leave the engine


def valid_requests() -> list[ValidRequest]:
    requests = [ValidRequest("/v1/completions", {"prompt": p, "max_tokens": VALID_MAX_TOKENS, "temperature": 0})
                for p in PROMPTS]
    requests += [ValidRequest("/v1/chat/completions", {"messages": [{"role": "user", "content": q}],
                                                        "max_tokens": VALID_MAX_TOKENS, "temperature": 0})
                 for q in QUESTIONS]
    return requests


def drive(url: str, settings: SoakSettings, results: Any) -> None:
    """The client process: learn the expected answers alone, then send the soak."""
    valid = asyncio.run(learn_expected(url, valid_requests()))
    plan = plan_requests(settings, valid)
    outcome, wall_s = asyncio.run(run_soak(url, plan, settings))
    results.put(summarize(outcome, wall_s))


def start_server(app: Any) -> tuple[str, Any, threading.Thread]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


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
    parser.add_argument("--num-requests", type=int, default=1200)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--request-timeout", type=float, default=30.0, help="the server's --request-timeout")
    parser.add_argument("--client-timeout", type=float, default=3.0, help="the client_timeout kind's patience")
    parser.add_argument("--long-tokens", type=int, default=1500, help="max_tokens of the long requests")
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
    url, server, thread = start_server(build_app(engine, config=server_config))
    settings = SoakSettings(
        num_requests=args.num_requests, concurrency=args.concurrency, max_model_len=args.max_model_len,
        max_request_body_bytes=server_config.max_request_body_bytes, client_timeout_s=args.client_timeout,
        long_body={"prompt": "Write a very long story about a dragon.", "max_tokens": args.long_tokens,
                   "ignore_eos": True, "temperature": 0}, seed=args.seed,
    )
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    client = context.Process(target=drive, args=(url, settings, results))
    client.start()
    summary = results.get()
    client.join()
    import httpx

    summary["health_after"] = httpx.get(f"{url}/health").status_code
    summary["engine_after"] = engine_report(engine)
    server.should_exit = True
    thread.join(30)
    engine.shutdown()
    summary["settings"] = {**vars(args), "model": built.model_name, "kv_cache_tokens": built.engine.kv_cache.pool.num_blocks
                           * built.engine.block_size, "max_num_seqs": built.engine.limits.scheduler.max_num_seqs}
    summary["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "device": "cpu", "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    ok = summary["num_5xx"] == 0 and summary["num_unexpected"] == 0 and summary["engine_after"]["kv_blocks_leaked"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
