"""A bounded soak on 127.0.0.1 with the fake runner: 1,000 requests at concurrency 64 mixing
valid requests, malformed JSON, oversize prompts and bodies, bad parameters, 10% client
disconnects mid-stream, client timeouts and server timeouts (benchmarks/soak_traffic.py).

After it: /health answers 200, the engine's invariants hold with every KV block free, every
valid request finished with the fake runner's exact output, and no client error got a 5xx.
benchmarks/soak.py runs the same traffic, longer, against the real default model.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from pathlib import Path

import httpx
from fake_engine import FakeTokenizer
from reliability_helpers import assert_all_blocks_free, engine_server, expected_text

from fitserve.config import ServerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from soak_traffic import SoakSettings, ValidRequest, plan_requests, run_soak, summarize  # noqa: E402

MAX_MODEL_LEN = 256
STEP_DELAY_S = 0.01  # per engine step: a valid request (<= 16 tokens) takes ~0.2 s, a long one ~2.4 s
REQUEST_TIMEOUT_S = 2.0  # far past a valid request; a long one cannot finish in under 2.4 s
BODY_LIMIT_BYTES = 64 * 1024
SETTINGS = SoakSettings(
    num_requests=1000, concurrency=64, max_model_len=MAX_MODEL_LEN, max_request_body_bytes=BODY_LIMIT_BYTES,
    long_body={"prompt": [7, 8, 9], "max_tokens": 240, "ignore_eos": True}, client_timeout_s=0.4, seed=8,
)
SOAK_TIME_LIMIT_S = 60.0  # typically 6 to 15 s; the bound keeps a hang from stalling CI


def valid_requests() -> list[ValidRequest]:
    requests = []
    for i in range(8):
        prompt, num_tokens = [10 * i + 1, 10 * i + 2], 4 + i
        requests.append(ValidRequest("/v1/completions", {"prompt": prompt, "max_tokens": num_tokens},
                                     expected_text(prompt[-1], num_tokens)))
        messages = [{"role": "user", "content": f"question {i}"}]
        last_id = FakeTokenizer().apply_chat_template(messages)[-1]
        requests.append(ValidRequest("/v1/chat/completions", {"messages": messages, "max_tokens": num_tokens},
                                     expected_text(last_id, num_tokens)))
    return requests


def test_soak_with_the_fake_runner():
    config = ServerConfig(request_timeout_s=REQUEST_TIMEOUT_S, max_request_body_bytes=BODY_LIMIT_BYTES)
    plan = plan_requests(SETTINGS, valid_requests())
    with engine_server(config, num_blocks=4096, max_num_seqs=128, max_num_batched_tokens=512,
                       max_model_len=MAX_MODEL_LEN, step_delay_s=STEP_DELAY_S) as (url, engine):
        results, wall_s = asyncio.run(asyncio.wait_for(run_soak(url, plan, SETTINGS), SOAK_TIME_LIMIT_S))
        summary = summarize(results, wall_s)
        assert httpx.get(f"{url}/health").status_code == 200
        assert_all_blocks_free(engine)
    print(summary)
    assert summary["requests_sent"] == SETTINGS.num_requests
    assert summary["num_5xx"] == 0 and summary["num_unexpected"] == 0, summary["unexpected_examples"]
    assert summary["valid"]["correct"] == summary["valid"]["sent"] > 0
    kinds = summary["requests_by_kind"]
    assert set(kinds) == {"valid", "disconnect", "malformed_json", "oversize", "bad_params", "client_timeout",
                          "server_timeout"}
    assert 0.07 <= kinds["disconnect"] / SETTINGS.num_requests <= 0.13
    assert summary["outcomes_by_kind"]["server_timeout"] == {"408": kinds["server_timeout"]}


def test_the_issue_mix_has_its_shares_and_the_clean_mix_only_valid_requests():
    valid = valid_requests()
    plan = plan_requests(replace(SETTINGS, num_requests=10_000, mix="issue"), valid)
    share = {kind: sum(p.kind == kind for p in plan) / len(plan) for kind in {p.kind for p in plan}}
    assert set(share) == {"valid", "disconnect", "malformed_json", "oversize", "slow_reader"}
    assert 0.09 <= share["disconnect"] <= 0.11 and 0.04 <= share["malformed_json"] <= 0.06
    assert 0.005 <= share["oversize"] <= 0.015 and share["slow_reader"] > 0
    assert {p.kind for p in plan_requests(replace(SETTINGS, mix="clean"), valid)} == {"valid"}


def test_issue_mix_soak_with_slow_readers_and_no_hangs():
    settings = replace(SETTINGS, num_requests=300, mix="issue", hang_timeout_s=30.0)
    config = ServerConfig(request_timeout_s=REQUEST_TIMEOUT_S, max_request_body_bytes=BODY_LIMIT_BYTES)
    plan = plan_requests(settings, valid_requests())
    with engine_server(config, num_blocks=4096, max_num_seqs=128, max_num_batched_tokens=512,
                       max_model_len=MAX_MODEL_LEN, step_delay_s=STEP_DELAY_S) as (url, engine):
        results, wall_s = asyncio.run(asyncio.wait_for(run_soak(url, plan, settings), SOAK_TIME_LIMIT_S))
        summary = summarize(results, wall_s)
        assert_all_blocks_free(engine)
    assert summary["num_5xx"] == 0 and summary["num_hangs"] == 0, summary
    assert summary["num_unexpected"] == 0, summary["unexpected_examples"]
    assert summary["outcomes_by_kind"]["slow_reader"] == {"200": summary["requests_by_kind"]["slow_reader"]}
