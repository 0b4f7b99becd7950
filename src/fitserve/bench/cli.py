"""`fitserve bench` and `fitserve sweep`: their flags (named as `vllm bench serve` names them)
and entry points. fitserve.cli registers them with add_bench_parsers()."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from fitserve.bench.benchmark import normalize_base_url, run_benchmark
from fitserve.bench.client import CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, BenchError, RequestSettings
from fitserve.bench.driver import RunOptions
from fitserve.bench.grid import parse_grid
from fitserve.bench.report import save_json
from fitserve.bench.server_metrics import DEFAULT_POLL_INTERVAL_S
from fitserve.bench.stats import DEFAULT_PERCENTILES, GOODPUT_METRICS
from fitserve.bench.workloads import DEFAULT_VOCAB_SIZE, WORKLOADS, Workload, WorkloadError, resolve_workload

BACKENDS = {"openai": COMPLETIONS_ENDPOINT, "openai-chat": CHAT_ENDPOINT}
EXIT_USER_ERROR = 2   # as `fitserve serve` exits for a setting that cannot work
EXIT_ALL_FAILED = 1   # the run happened but no request succeeded


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The flags `fitserve bench` and `fitserve sweep` share: what to send and how."""
    g = parser.add_argument_group("workload (a named workload's values, unless a flag overrides them)")
    g.add_argument("--workload", default="custom", metavar="NAME",
                   help=f"{', '.join(WORKLOADS)} (docs/benchmarks.md) or custom (default)")
    g.add_argument("--num-prompts", type=int, default=None, help="requests to send (custom: 100)")
    g.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (custom: no cap)")
    g.add_argument("--request-rate", type=float, default=None,
                   help="mean arrivals per second, Poisson or gamma (see --burstiness); default inf: all at once")
    g.add_argument("--burstiness", type=float, default=None,
                   help="gamma shape of the arrival gaps: 1 Poisson, <1 burstier, >1 more regular")
    g.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=None,
                   help="prompt tokens (custom: 512)")
    g.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=None,
                   help="output tokens (custom: 128; W5: the long request's)")
    g.add_argument("--prefix-len", "--random-prefix-len", dest="prefix_len", type=int, default=None,
                   help="tokens every prompt starts with, the same for all (a shared system prompt), before its "
                        "--input-len own (shared-prefix: 1000; else 0)")
    g.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=float, default=None,
                   help="lengths uniform in [len*(1-r), len*(1+r)], 0 <= r < 1 (default 0)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrival times")
    r = parser.add_argument_group("requests")
    r.add_argument("--backend", default="openai", choices=sorted(BACKENDS),
                   help="openai: token-id prompts on /v1/completions; openai-chat: text on /v1/chat/completions")
    r.add_argument("--endpoint", default=None, help="API path, if not the backend's")
    r.add_argument("--model", default=None, help="model name to send; default: the first of /v1/models")
    r.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer`")
    r.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send vLLM's ignore_eos so output lengths are exact (default on)")
    r.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    r.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help=f"prompt token ids are drawn from [0, this) (default {DEFAULT_VOCAB_SIZE})")
    r.add_argument("--extra-body", type=json.loads, default=None, help="JSON object merged into every request")
    r.add_argument("--request-timeout", type=float, default=3600.0, help="seconds to wait for a response chunk")
    r.add_argument("--ready-check-timeout-sec", type=float, default=600.0,
                   help="retry the initial test request this long while the server starts; 0 skips it")
    r.add_argument("--metric-percentiles", default=",".join(f"{p:g}" for p in DEFAULT_PERCENTILES),
                   help="percentiles reported besides the median (default 90,99)")
    r.add_argument("--goodput", nargs="+", metavar="KEY:MS", default=None,
                   help="service-level objectives for goodput, e.g. ttft:500 tpot:50 (keys ttft, tpot, e2el)")
    r.add_argument("--num-warmups", type=int, default=0, help="untimed requests sent before the run")
    r.add_argument("--metrics-interval", type=float, default=DEFAULT_POLL_INTERVAL_S,
                   help="seconds between scrapes of the server's /metrics during the run")
    r.add_argument("--client-processes", type=int, default=1,
                   help="processes that send the requests, each with its own event loop, HTTP client and a share "
                        "of --max-concurrency, so the client is not the limit (default 1; not with W5)")
    r.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    r.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def workload_from_args(args: argparse.Namespace) -> Workload:
    return resolve_workload(
        args.workload, num_prompts=args.num_prompts, max_concurrency=args.max_concurrency,
        request_rate=args.request_rate, burstiness=args.burstiness, input_len=args.input_len,
        output_len=args.output_len, range_ratio=args.range_ratio, prefix_len=args.prefix_len)


def settings_from_args(args: argparse.Namespace, base_url: str) -> RequestSettings:
    return RequestSettings(base_url=normalize_base_url(base_url), endpoint=args.endpoint or BACKENDS[args.backend],
                           model=args.model or "", ignore_eos=args.ignore_eos, temperature=args.temperature,
                           api_key=args.api_key, extra_body=args.extra_body or {})


def options_from_args(args: argparse.Namespace) -> RunOptions:
    return RunOptions(seed=args.seed, vocab_size=args.vocab_size, request_timeout_s=args.request_timeout,
                      ready_timeout_s=args.ready_check_timeout_sec, metrics_interval_s=args.metrics_interval,
                      num_warmups=args.num_warmups, progress=not args.disable_tqdm,
                      client_processes=args.client_processes)


def parse_percentiles(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise BenchError(f"--metric-percentiles must be numbers separated by commas, not {text!r}") from None
    if not all(0 < p < 100 for p in values):
        raise BenchError(f"--metric-percentiles must be between 0 and 100, not {text!r}")
    return values


def parse_goodput(pairs: list[str] | None) -> dict[str, float] | None:
    if not pairs:
        return None
    slos: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        try:
            slos[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or name not in GOODPUT_METRICS or slos[name] < 0:
            raise BenchError(f"--goodput takes KEY:MILLISECONDS with KEY one of {', '.join(GOODPUT_METRICS)}, "
                             f"not {pair!r}")
    return slos


def parse_metadata(pairs: list[str] | None) -> dict[str, str]:
    metadata = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BenchError(f"--metadata takes KEY=VALUE pairs, not {pair!r}")
        metadata[key] = value
    return metadata


def bench_command(args: argparse.Namespace) -> int:
    try:
        output = run_benchmark(
            workload_from_args(args), settings_from_args(args, args.base_url), options_from_args(args),
            percentiles=parse_percentiles(args.metric_percentiles), metadata=parse_metadata(args.metadata),
            save_detailed=args.save_detailed, goodput_slos_ms=parse_goodput(args.goodput))
    except (BenchError, WorkloadError) as error:
        print(f"fitserve bench: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    if output.result["workload"]["server_note"]:
        print(f"note: {output.result['workload']['server_note']}")
    print(output.table())
    if args.save_result:
        save_json(args.save_result, output.result)
        print(f"saved {args.save_result}")
    return 0 if output.metrics.completed else EXIT_ALL_FAILED


def sweep_command(args: argparse.Namespace) -> int:
    from fitserve.bench.sweep import READY_CHECK_AFTER_HEALTH_S, rerender, run_sweep  # subprocesses, matplotlib

    output_dir = Path(args.output_dir)
    try:
        if args.rerender:
            document = rerender(output_dir)
            print(document["table"])
            print(document["advice"])
            return 0
        if not args.grid:
            raise BenchError("--grid is required (or --rerender to redo the table and plots of a finished sweep)")
        axes = parse_grid(args.grid)
        workload = workload_from_args(args)
        percentiles = parse_percentiles(args.metric_percentiles)
        metadata = parse_metadata(args.metadata)
        goodput = parse_goodput(args.goodput)
    except (BenchError, WorkloadError) as error:
        print(f"fitserve sweep: {error}", file=sys.stderr)
        return 2
    # /health answered before the benchmark starts: the test request need not wait long.
    options = dataclasses.replace(options_from_args(args), ready_timeout_s=READY_CHECK_AFTER_HEALTH_S)

    def bench(base_url: str) -> dict:
        return run_benchmark(workload, settings_from_args(args, base_url), options,
                             percentiles=percentiles, metadata=metadata, goodput_slos_ms=goodput).result

    document = run_sweep(axes, workload, bench, server_command=args.server_command, server_args=args.server_args,
                         output_dir=output_dir, startup_timeout_s=args.startup_timeout, metadata=metadata)
    print(document["table"])
    print(document["advice"])
    print(f"saved {output_dir / 'sweep.json'}, {output_dir / 'sweep.md'} and {len(document['plots'])} plots")
    return 0


def add_bench_parsers(commands: argparse._SubParsersAction) -> None:
    """Register `bench` and `sweep` on fitserve's subcommands; each sets `args.handler`."""
    bench = commands.add_parser("bench", help="benchmark a running OpenAI-compatible server (W1-W6, shared-prefix or custom)")
    bench.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, e.g. http://127.0.0.1:8000")
    add_workload_args(bench)
    out = bench.add_argument_group("results")
    out.add_argument("--save-result", metavar="FILE.json", default=None, help="write every figure as JSON")
    out.add_argument("--save-detailed", action="store_true", help="also each request's timings in the JSON")
    out.add_argument("--metadata", nargs="*", metavar="KEY=VALUE", help="extra facts to record in the JSON")
    bench.set_defaults(handler=bench_command)

    sweep = commands.add_parser("sweep", help="start a server for each point of a grid and benchmark it")
    sweep.add_argument("--grid", action="append", metavar="NAME=V1,V2,...",
                       help="a server flag and its values, e.g. max_num_seqs=1,4,8; repeat for a product; "
                            "the value 'default' leaves the flag out")
    sweep.add_argument("--server-command", default=None,
                       help="the server to start (default: this Python's `fitserve serve`); "
                            "--host and --port are appended")
    sweep.add_argument("--server-args", default="", help="flags every server gets, e.g. '--max-model-len 2048'")
    sweep.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /health")
    sweep.add_argument("--output-dir", required=True, help="where sweep.json, sweep.md, plots and logs go")
    sweep.add_argument("--rerender", action="store_true",
                       help="run nothing: redo the table, advice and plots of the sweep in --output-dir")
    sweep.add_argument("--metadata", nargs="*", metavar="KEY=VALUE", help="extra facts to record in the JSON")
    add_workload_args(sweep)
    sweep.set_defaults(handler=sweep_command)

