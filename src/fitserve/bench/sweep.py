"""`fitserve sweep`: a server per grid point, the same workload against each, one table.

A point whose server does not start is a result (its exit code and error paragraph), as the
guide's "crash on startup" rows are; so is a point whose benchmark cannot run.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from fitserve.bench.client import BenchError
from fitserve.bench.grid import (  # noqa: F401  (parse_grid, grid_points: this module's API)
    GridAxis,
    grid_points,
    parse_grid,
    point_flags,
    point_label,
)
from fitserve.bench.report import provenance, save_json
from fitserve.bench.server_process import ServerProcess, free_port
from fitserve.bench.workloads import Workload

READY_CHECK_AFTER_HEALTH_S = 60.0
PROVENANCE_KEYS = ("format_version", "date", "command_line", "commit", "dirty", "dirty_files", "machine")


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
