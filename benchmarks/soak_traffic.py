"""The soak's traffic: a seeded mix of valid and hostile requests, a closed-loop driver at a
fixed concurrency, and the summary (requests by kind, answers by status, p99 of the valid).

Used by benchmarks/soak.py (the real model, by hand) and tests/test_soak.py (the fake runner,
in CI). Torch-free; needs only httpx. Every request goes to the URL it is given (127.0.0.1).

Kinds, and what the server must answer:
  valid           completions or chat, streamed or not: 200 and exactly the expected text
  disconnect      a long stream the client drops after two events (the server must abort it)
  malformed_json  a body that is not JSON: 400
  oversize        a prompt longer than the context (400) or a body over the size limit (413)
  bad_params      a parameter out of range, an unknown model, a wrong type...: 400 or 404
  client_timeout  a long request the client gives up on (the server must abort it)
  server_timeout  a request longer than the server's --request-timeout: 408
  slow_reader     a valid streamed request read one event every SLOW_READ_DELAY_S: the expected text

Mixes (SoakSettings.mix): "default" (KIND_WEIGHTS, every kind), "issue" (the reliability issue's
soak: 10% disconnects mid-stream, 5% malformed bodies, 1% oversized, 2% slow readers, the rest
valid) and "clean" (valid only: the baseline the others are compared with). A request with no
answer within SoakSettings.hang_timeout_s counts as a hang.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

KIND_WEIGHTS = {"valid": 50, "disconnect": 10, "malformed_json": 8, "oversize": 8, "bad_params": 12,
                "client_timeout": 6, "server_timeout": 6}
MIXES = {"default": KIND_WEIGHTS,
         "issue": {"valid": 82, "disconnect": 10, "malformed_json": 5, "oversize": 1, "slow_reader": 2},
         "clean": {"valid": 100}}
SLOW_READ_DELAY_S = 0.2  # between the events a slow reader reads
MALFORMED_BODIES = [b'{"prompt": "abc", ', b"not json", b'{"prompt": "a"}}', b"", b"[1, 2", b'{"prompt": "\xff"}']
DISCONNECT_AFTER_EVENTS = 2
NOT_A_MODEL = "no-such-model"
CLIENT_KEEPALIVE_EXPIRY_S = 2.0  # under the server's --timeout-keep-alive (see run_soak)


@dataclass(frozen=True)
class ValidRequest:
    path: str  # /v1/completions or /v1/chat/completions
    body: dict[str, Any]  # without "stream"
    expected_text: str | None = None  # None: learnt from a solo run before the soak


@dataclass(frozen=True)
class SoakSettings:
    num_requests: int
    concurrency: int
    max_model_len: int
    max_request_body_bytes: int
    long_body: dict[str, Any]  # a completions body that runs for a long time (ignore_eos)
    client_timeout_s: float  # the client_timeout kind gives up after this long
    server_timeout: bool = True  # the server runs with --request-timeout (else no server_timeout kind)
    seed: int = 0
    mix: str = "default"  # a key of MIXES
    hang_timeout_s: float = 300.0  # no answer within this long: a hang


@dataclass(frozen=True)
class Planned:
    kind: str
    path: str
    body: dict[str, Any] | bytes
    stream: bool = False
    expected_text: str | None = None
    expected_statuses: tuple[int, ...] = ()


@dataclass
class Result:
    kind: str
    outcome: str  # an HTTP status, or "disconnected", "client_timeout", "transport_error"
    latency_s: float
    ok: bool
    detail: str = ""


def bad_param_bodies(max_model_len: int) -> list[tuple[str, dict[str, Any], int]]:
    chat = "/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    completion_cases: list[tuple[dict[str, Any], int]] = [
        ({"temperature": 5}, 400), ({"top_p": 1.5}, 400), ({"max_tokens": 0}, 400), ({"n": 1000}, 400),
        ({"model": NOT_A_MODEL}, 404), ({"seed": 2**70}, 400), ({"top_k": 2**64}, 400), ({"stop": [""]}, 400),
        ({"max_tokens": 2 * max_model_len}, 400), ({"stream_options": {"include_usage": True}}, 400),
        ({"prompt": [10**9]}, 400), ({"prompt": {"text": "x"}}, 400), ({"max_tokens": "many"}, 400),
    ]
    cases = [("/v1/completions", {"prompt": "hi", **extra}, status) for extra, status in completion_cases]
    cases += [(chat, {"messages": []}, 400), (chat, {"messages": "hello"}, 400),
              (chat, {"messages": [{"role": "wizard", "content": "x"}]}, 400),
              (chat, {"messages": user, "logprobs": True, "top_logprobs": 21}, 400),
              (chat, {"messages": user, "logit_bias": {"5": 500}}, 400),
              (chat, {"messages": user, "model": NOT_A_MODEL}, 404)]
    return cases


def plan_requests(settings: SoakSettings, valid: list[ValidRequest]) -> list[Planned]:
    """`settings.num_requests` requests, kinds drawn by KIND_WEIGHTS from a seeded generator."""
    rng = random.Random(settings.seed)
    weights = {k: w for k, w in MIXES[settings.mix].items() if settings.server_timeout or k != "server_timeout"}
    kinds = rng.choices(list(weights), weights=list(weights.values()), k=settings.num_requests)
    bad = bad_param_bodies(settings.max_model_len)
    return [_plan_one(kind, rng, settings, valid, bad) for kind in kinds]


def _plan_one(kind: str, rng: random.Random, settings: SoakSettings, valid: list[ValidRequest],
              bad: list[tuple[str, dict[str, Any], int]]) -> Planned:
    completions = "/v1/completions"
    if kind in ("valid", "slow_reader"):
        request = rng.choice(valid)
        stream = kind == "slow_reader" or rng.random() < 0.5
        return Planned(kind, request.path, request.body, stream, request.expected_text, (200,))
    if kind == "malformed_json":
        return Planned(kind, rng.choice([completions, "/v1/chat/completions"]), rng.choice(MALFORMED_BODIES),
                       expected_statuses=(400,))
    if kind == "oversize":
        if rng.random() < 0.5:
            return Planned(kind, completions, {"prompt": [1] * (settings.max_model_len + 8)}, expected_statuses=(400,))
        return Planned(kind, completions, {"prompt": "a" * settings.max_request_body_bytes}, expected_statuses=(413,))
    if kind == "bad_params":
        path, body, status = rng.choice(bad)
        return Planned(kind, path, body, expected_statuses=(status,))
    if kind == "disconnect":
        return Planned(kind, completions, settings.long_body, stream=True)
    if kind == "client_timeout":
        return Planned(kind, completions, settings.long_body)
    return Planned(kind, completions, settings.long_body, expected_statuses=(408,))  # server_timeout


# -- sending ------------------------------------------------------------------------------------


def _content(planned: Planned) -> tuple[bytes, dict[str, str]]:
    if isinstance(planned.body, bytes):
        return planned.body, {"content-type": "application/json"}
    body = {**planned.body, "stream": True} if planned.stream else planned.body
    return json.dumps(body).encode(), {"content-type": "application/json"}


def stream_text(events: list[str]) -> tuple[str, str | None, str | None]:
    """(text, finish_reason, error) of SSE data events, chat or completions."""
    text, finish, error = "", None, None
    for event in events:
        if event == "[DONE]":
            continue
        chunk = json.loads(event)
        if "error" in chunk:
            error = json.dumps(chunk["error"])
            continue
        for choice in chunk.get("choices", []):
            text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            finish = choice.get("finish_reason") or finish
    return text, finish, error


async def _send_stream(client: httpx.AsyncClient, planned: Planned) -> tuple[str, str, list[str]]:
    """(outcome, detail, data events); a disconnect request leaves after DISCONNECT_AFTER_EVENTS."""
    content, headers = _content(planned)
    events: list[str] = []
    async with client.stream("POST", planned.path, content=content, headers=headers) as resp:
        if resp.status_code != 200:
            return str(resp.status_code), (await resp.aread()).decode(errors="replace")[:300], events
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if planned.kind == "disconnect" and len(events) >= DISCONNECT_AFTER_EVENTS:
                    return "disconnected", "", events
                if planned.kind == "slow_reader":
                    await asyncio.sleep(SLOW_READ_DELAY_S)
    return "200", "", events


async def _send(client: httpx.AsyncClient, planned: Planned, client_timeout_s: float) -> Result:
    start_s = time.monotonic()
    try:
        if planned.stream:
            outcome, detail, events = await _send_stream(client, planned)
        else:
            content, headers = _content(planned)
            timeout = client_timeout_s if planned.kind == "client_timeout" else client.timeout
            resp = await client.post(planned.path, content=content, headers=headers, timeout=timeout)
            outcome, detail, events = str(resp.status_code), resp.text[:2000], []
    except httpx.TimeoutException:
        outcome, detail, events = "client_timeout", "", []
    except httpx.TransportError as error:
        outcome, detail, events = "transport_error", repr(error), []
    latency_s = time.monotonic() - start_s
    ok, why = judge(planned, outcome, detail, events)
    return Result(planned.kind, outcome, latency_s, ok, why)


def judge(planned: Planned, outcome: str, detail: str, events: list[str]) -> tuple[bool, str]:
    """Did the server answer as it must for this kind? (ok, why not)."""
    if planned.kind == "disconnect":
        return outcome == "disconnected", f"{outcome}: {detail[:200]}"
    if planned.kind == "client_timeout":
        return outcome in ("client_timeout", "200"), outcome
    if outcome not in {str(s) for s in planned.expected_statuses}:
        return False, f"{outcome} (expected {planned.expected_statuses}): {detail[:300]}"
    if outcome != "200":
        error = json.loads(detail).get("error", {})
        return set(error) == {"message", "type", "param", "code"}, detail[:300]
    return _judge_valid(planned, detail, events)


def _judge_valid(planned: Planned, detail: str, events: list[str]) -> tuple[bool, str]:
    if planned.stream:
        if not events or events[-1] != "[DONE]":
            return False, f"stream did not end with [DONE]: {events[-2:]}"
        text, finish, error = stream_text(events)
    else:
        choice = json.loads(detail)["choices"][0]
        text = choice.get("text") if "text" in choice else choice["message"]["content"]
        finish, error = choice.get("finish_reason"), None
    if error or finish not in ("length", "stop"):
        return False, f"finish {finish}, error {error}"
    if planned.expected_text is not None and text != planned.expected_text:
        return False, f"text {text!r} != expected {planned.expected_text!r}"
    return True, ""


async def run_soak(url: str, plan: list[Planned], settings: SoakSettings) -> tuple[list[Result], float]:
    """Send the plan with `settings.concurrency` requests in flight; returns (results, wall seconds)."""
    # A pooled connection must expire on the client before the server's idle timeout closes it
    # (--timeout-keep-alive, 5 s): with both at 5 s (httpx's default) a request sent on a connection
    # the server is closing at that instant fails in transport, a race of HTTP/1.1 keep-alive, not
    # of the server. Clients that retry on connection errors (the openai client does) never see it.
    limits = httpx.Limits(max_connections=settings.concurrency + 8, max_keepalive_connections=settings.concurrency,
                          keepalive_expiry=CLIENT_KEEPALIVE_EXPIRY_S)
    queue: asyncio.Queue[Planned] = asyncio.Queue()
    for planned in plan:
        queue.put_nowait(planned)
    results: list[Result] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await _send(client, queue.get_nowait(), settings.client_timeout_s))

    start_s = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=settings.hang_timeout_s, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(settings.concurrency)))
    return results, time.monotonic() - start_s


async def learn_expected(url: str, valid: list[ValidRequest]) -> list[ValidRequest]:
    """Fill in expected texts by running each valid request alone (greedy: its reference answer)."""
    learnt = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for request in valid:
            resp = await client.post(request.path, json=request.body)
            resp.raise_for_status()
            choice = resp.json()["choices"][0]
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            learnt.append(ValidRequest(request.path, request.body, text))
    return learnt


# -- summary ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(results: list[Result], wall_s: float) -> dict[str, Any]:
    by_kind: dict[str, dict[str, int]] = {}
    statuses: dict[str, int] = {}
    for result in results:
        outcomes = by_kind.setdefault(result.kind, {})
        outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
        if result.outcome.isdigit() and result.outcome != "200":
            statuses[result.outcome] = statuses.get(result.outcome, 0) + 1
    valid = [r for r in results if r.kind == "valid"]
    latencies = [r.latency_s for r in valid if r.ok]
    unexpected = [f"{r.kind}: {r.detail}" for r in results if not r.ok]
    hangs = [r for r in results if r.outcome == "client_timeout" and r.kind != "client_timeout"]
    return {
        "requests_sent": len(results),
        "requests_by_kind": {kind: sum(n.values()) for kind, n in sorted(by_kind.items())},
        "outcomes_by_kind": {kind: dict(sorted(n.items())) for kind, n in sorted(by_kind.items())},
        "errors_by_status": dict(sorted(statuses.items())),
        "num_5xx": sum(n for status, n in statuses.items() if status.startswith("5")),
        "num_unexpected": len(unexpected),
        "num_hangs": len(hangs),
        "unexpected_examples": unexpected[:20],
        "valid": {"sent": len(valid), "correct": sum(r.ok for r in valid),
                  "latency_p50_s": round(percentile(latencies, 0.50), 4),
                  "latency_p99_s": round(percentile(latencies, 0.99), 4),
                  "latency_max_s": round(max(latencies, default=float("nan")), 4),
                  "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else None},
        "wall_s": round(wall_s, 2),
        "requests_per_s": round(len(results) / wall_s, 1) if wall_s else None,
    }
