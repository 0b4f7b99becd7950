"""`fitserve sweep`: a server per grid point, the same workload against each, one table.

A point whose server does not start is a result (its exit code and error paragraph), as the
guide's "crash on startup" rows are; so is a point whose benchmark cannot run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from fitserve.bench.benchmark import run_benchmark
from fitserve.bench.client import BenchError
from fitserve.bench.report import provenance, save_json
from fitserve.bench.server_process import ServerProcess, free_port
from fitserve.bench.workloads import Workload, WorkloadError

DEFAULT_VALUE = "default"   # a grid value that leaves the flag out: the server's own default
READY_CHECK_AFTER_HEALTH_S = 60.0
PROVENANCE_KEYS = ("format_version", "date", "command_line", "commit", "dirty", "dirty_files", "machine")


@dataclass(frozen=True, slots=True)
class GridAxis:
    name: str                 # as the user wrote it, underscores: max_num_seqs
    values: tuple[str, ...]   # as written; DEFAULT_VALUE leaves the flag out

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def parse_grid(specs: list[str]) -> list[GridAxis]:
    axes = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        parts = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or not name or not parts:
            raise BenchError(f"--grid takes NAME=V1,V2,... (e.g. max_num_seqs=1,4,8), not {spec!r}")
        if any(a.name == name for a in axes):
            raise BenchError(f"--grid names {name} twice")
        axes.append(GridAxis(name, parts))
    return axes


def grid_points(axes: list[GridAxis]) -> list[dict[str, str]]:
    """Every combination, the first axis varying slowest, in the order the values were given."""
    return [dict(zip((a.name for a in axes), combo)) for combo in itertools.product(*(a.values for a in axes))]


def point_flags(point: dict[str, str]) -> list[str]:
    flags = []
    for name, value in point.items():
        if value.lower() != DEFAULT_VALUE:
            flags += [GridAxis(name, ()).flag, value]
    return flags


def point_label(point: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def base_server_command(server_command: str | None) -> list[str]:
    if server_command:
        return shlex.split(server_command)
    return [sys.executable, "-m", "fitserve", "serve"]


def run_point(index: int, point: dict[str, str], command: list[str], output_dir: Path,
              startup_timeout_s: float, bench) -> dict:
    """Start the server, benchmark it with `bench(base_url) -> result dict`, stop it."""
    port = free_port()
    full = [*command, *point_flags(point), "--host", "127.0.0.1", "--port", str(port)]
    server = ServerProcess(full, output_dir / f"server-{index}.log", port)
    row: dict = {"index": index, "params": point, "label": point_label(point), "server_command": shlex.join(full),
                 "log": server.log_path.name, "result": None}
    try:
        start = server.start(startup_timeout_s)
        row.update(startup_s=start.startup_s, exit_code=start.exit_code, error=start.error,
                   kv_cache_tokens=start.kv_cache_tokens,
                   max_concurrency_at_max_model_len=start.max_concurrency_at_max_model_len)
        if not start.ready:
            row["status"] = "startup_failed"
            return row
        try:
            result = bench(server.base_url)
            row["result"] = {k: v for k, v in result.items() if k not in PROVENANCE_KEYS}
            row["status"] = "ok" if result["completed"] else "all_requests_failed"
        except BenchError as error:
            row.update(status="bench_failed", error=str(error))
    finally:
        server.stop()
    return row


def run_sweep(axes: list[GridAxis], workload: Workload, bench, *, server_command: str | None, server_args: str,
              output_dir: Path, startup_timeout_s: float, argv: list[str] | None = None,
              metadata: dict | None = None, log=print) -> dict:
    """Every grid point in turn; returns the sweep document (also written as sweep.json)."""
    command = [*base_server_command(server_command), *shlex.split(server_args)]
    points = grid_points(axes)
    rows = []
    for index, point in enumerate(points):
        log(f"[{index + 1}/{len(points)}] {point_label(point)}: starting the server")
        row = run_point(index, point, command, output_dir, startup_timeout_s, bench)
        log(f"[{index + 1}/{len(points)}] {point_label(point)}: {summary_line(row)}")
        rows.append(row)
    document = provenance(argv)
    document.update(grid={a.name: list(a.values) for a in axes}, server_command=shlex.join(command),
                    workload=workload.to_json(), metadata=metadata or {}, points=rows)
    return render(document, axes, workload, output_dir)


def render(document: dict, axes: list[GridAxis], workload: Workload, output_dir: Path) -> dict:
    """The advice, the table and the plots of a sweep's points; writes sweep.json and sweep.md."""
    from fitserve.bench.sweep_report import advice, markdown_table, plot_sweep, write_markdown

    rows = document["points"]
    document["advice"] = advice(rows, axes, workload)
    document["table"] = markdown_table(rows, axes, workload)
    document["plots"] = plot_sweep(rows, axes, workload, output_dir)
    save_json(output_dir / "sweep.json", document)
    write_markdown(output_dir / "sweep.md", document)
    return document


def rerender(output_dir: Path, argv: list[str] | None = None) -> dict:
    """`--rerender`: a finished sweep's table, advice and plots made again by this version from
    its sweep.json (the measurements and their provenance are kept; `rendered_by` says who)."""
    try:
        document = json.loads((output_dir / "sweep.json").read_text(encoding="utf-8"))
        axes = [GridAxis(name, tuple(values)) for name, values in document["grid"].items()]
        fields = {**document["workload"], "request_rate": float(document["workload"]["request_rate"])}
        workload = Workload(**fields)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BenchError(f"cannot read a sweep from {output_dir / 'sweep.json'}: {error}") from None
    rendered_by = provenance(argv)
    document["rendered_by"] = {k: rendered_by[k] for k in ("date", "command_line", "commit", "dirty")}
    return render(document, axes, workload, output_dir)


def summary_line(row: dict) -> str:
    if row["status"] == "startup_failed":
        first = row["error"].strip().splitlines()[-1] if row["error"].strip() else "no output"
        return f"start-up failed (exit code {row['exit_code']}): {first}"
    if row["status"] == "bench_failed":
        return f"benchmark failed: {row['error']}"
    r = row["result"]
    return (f"{r['request_throughput']:.2f} req/s, {r['output_throughput']:.1f} output tok/s, "
            f"{r['failed']} failed")


def run_sweep_command(args: argparse.Namespace) -> int:
    from fitserve.bench.cli import (
        options_from_args,
        parse_goodput,
        parse_metadata,
        parse_percentiles,
        settings_from_args,
        workload_from_args,
    )

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
