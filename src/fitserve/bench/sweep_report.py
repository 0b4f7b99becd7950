"""A sweep's outputs for people: the guide-shaped markdown table, one line of advice, and
PNG plots of throughput and latency against the swept parameter (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

from fitserve.bench.grid import DEFAULT_VALUE, GridAxis
from fitserve.bench.workloads import Workload
from fitserve.config import ConfigError, parse_size_bytes

THROUGHPUT_TOLERANCE = 0.02   # "within 2% of the best": gains below this are noise on a shared machine
KV_BOUND_USAGE_PCT = 90.0     # a peak KV usage above this means the cache, not compute, caps the batch
PLOT_DPI = 120


def workload_caption(w: Workload) -> str:
    concurrency = "no cap on" if w.max_concurrency is None else f"at most {w.max_concurrency}"
    return (f"{w.name}: {w.num_prompts} requests, {concurrency} concurrent, "
            f"{w.input_len} prompt / {w.output_len} output tokens")


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def result_cell(row: dict) -> str:
    if row["status"] == "startup_failed":
        lines = row["error"].strip().splitlines()
        reason = lines[-1] if lines else "no output"
        return f"start-up failed (exit {row['exit_code']}): {reason}".replace("|", "\\|")
    if row["status"] == "bench_failed":
        return f"benchmark failed: {row['error']}".replace("|", "\\|")
    r = row["result"]
    return "ok" if not r["failed"] else f"{r['failed']} of {r['completed'] + r['failed']} requests failed"


def _fits(row: dict, workload: Workload) -> str:
    """Requests of this workload the KV cache holds at once: the guide's "Max Concurrent"."""
    if row.get("kv_cache_tokens") is None:
        return "-"
    return str(row["kv_cache_tokens"] // (workload.input_len + workload.output_len))


def _load(result: dict) -> str:
    """The 1-minute load average before -> after the run: how busy the machine was."""
    before, after = result.get("load_average_before"), result.get("load_average_after")
    if not before or not after:
        return "-"
    return f"{before[0]:.1f}->{after[0]:.1f}"


def observation(row: dict, best_req_s: float | None) -> str:
    """How the point compares with the best one, and what the server saw."""
    if row["status"] != "ok" or not best_req_s:
        return "-"
    r = row["result"]
    notes = ["best" if r["request_throughput"] >= best_req_s else f"{r['request_throughput'] / best_req_s - 1:+.0%}"]
    server = r.get("server_metrics") or {}
    if (server.get("num_preemptions") or 0) > 0:
        notes.append("preempting")
    if (server.get("peak_kv_cache_usage_pct") or 0) >= KV_BOUND_USAGE_PCT:
        notes.append("KV cache full")
    return ", ".join(notes)


def markdown_table(rows: list[dict], axes: list[GridAxis], workload: Workload) -> str:
    """One row per point, in the grid's order: the guide's tables, with the figures the run saw."""
    names = [a.name for a in axes]
    header = [*names, "Throughput (req/s)", "Output (tok/s)", "Mean TTFT (ms)", "Mean latency (ms)",
              "P99 latency (ms)", "Preemptions", "Peak KV (%)", "KV cache (tokens)", "Requests that fit",
              "Start-up (s)", "Load avg", "Result", "Observation"]
    energy = has_energy(rows)
    if energy:  # only for servers that report GPU energy (fitserve's fitserve:gpu_* series)
        header[-2:-2] = ["Mean power (W)", "J / output token"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = max((row["result"]["request_throughput"] for row in rows if row["status"] == "ok"), default=None)
    for row in rows:
        r = row["result"] or {}
        server = r.get("server_metrics") or {}
        cells = [row["params"][n] for n in names] + [
            _fmt(r.get("request_throughput")), _fmt(r.get("output_throughput"), 1), _fmt(r.get("mean_ttft_ms"), 0),
            _fmt(r.get("mean_e2el_ms"), 0), _fmt(r.get("p99_e2el_ms"), 0), _fmt(server.get("num_preemptions"), 0),
            _fmt(server.get("peak_kv_cache_usage_pct"), 0),
            "-" if row.get("kv_cache_tokens") is None else str(row["kv_cache_tokens"]), _fits(row, workload),
            _fmt(row.get("startup_s"), 1), _load(r), result_cell(row), observation(row, best)]
        if energy:
            cells[-2:-2] = [_fmt(r.get("mean_power_w"), 0), _fmt(r.get("joules_per_output_token"), 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def has_energy(rows: list[dict]) -> bool:
    return any(row["status"] == "ok" and row["result"].get("energy_j") is not None for row in rows)


def _sort_key(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return float(parse_size_bytes(value))
    except ConfigError:
        return None


def ordered(rows: list[dict], axes: list[GridAxis]) -> list[dict]:
    """Smallest value first for a one-parameter numeric sweep; otherwise the grid's order."""
    if len(axes) != 1:
        return rows
    keys = [_sort_key(row["params"][axes[0].name]) for row in rows]
    if any(k is None for k in keys):
        return rows
    return [row for _, row in sorted(zip(keys, rows), key=lambda pair: pair[0])]


def _throughput(row: dict) -> float:
    return row["result"]["request_throughput"]


def is_ordinal(axes: list[GridAxis]) -> bool:
    """One axis of amounts (numbers or sizes, 'default' allowed), so that 'larger' means more of it."""
    return len(axes) == 1 and all(v.lower() == DEFAULT_VALUE or _sort_key(v) is not None for v in axes[0].values)


def limit_reason(row: dict, workload: Workload) -> str | None:
    """What capped throughput at this point, when the run says: preemption, KV cache, the client."""
    server = row["result"].get("server_metrics") or {}
    if (server.get("num_preemptions") or 0) > 0:
        return (f"preempting: {server['num_preemptions']:.0f} preemptions at this point, the KV cache is too small "
                "for this load")
    if (server.get("peak_kv_cache_usage_pct") or 0) >= KV_BOUND_USAGE_PCT:
        return f"KV-bound: the KV cache peaked at {server['peak_kv_cache_usage_pct']:.0f}% full"
    tokens_per_request = workload.input_len + workload.output_len
    kv_tokens = row.get("kv_cache_tokens")
    if kv_tokens is not None and workload.max_concurrency and kv_tokens < workload.max_concurrency * tokens_per_request:
        return (f"KV-bound: the cache holds {kv_tokens} tokens, about {kv_tokens // tokens_per_request} requests of "
                f"{tokens_per_request} tokens, fewer than the {workload.max_concurrency} the workload keeps in flight")
    seqs = _sort_key(row["params"].get("max_num_seqs", ""))
    if seqs is not None and workload.max_concurrency and seqs >= workload.max_concurrency:
        return (f"client-bound: the workload keeps at most {workload.max_concurrency} requests in flight, "
                "so a larger max_num_seqs has nothing more to batch")
    return None


def bottleneck(row: dict, ok_rows: list[dict], workload: Workload, ordinal: bool) -> str:
    """Why the chosen point is enough (or is not), from what the runs saw."""
    reason = limit_reason(row, workload)
    if reason is not None:
        return reason
    if len(ok_rows) == 1:
        return "the only point that ran"
    if not ordinal:  # values are choices, not amounts: compare each with the chosen one
        others = [o for o in ok_rows if o is not row]
        return "against it, " + ", ".join(
            f"{o['label']} gives {_throughput(o) / _throughput(row) - 1:+.0%} throughput at "
            f"{_fmt(o['result']['mean_e2el_ms'], 0)} ms mean latency (here {_fmt(row['result']['mean_e2el_ms'], 0)})"
            for o in others)
    larger = ok_rows[ok_rows.index(row) + 1:]
    if not larger:
        return "throughput still rises at the largest value tried: extend the grid"
    gain = _throughput(max(larger, key=_throughput)) / _throughput(row) - 1.0
    slowest = max(larger, key=lambda x: x["result"]["mean_e2el_ms"] or 0.0)
    return (f"compute-bound: larger values add {gain:+.1%} throughput at most while mean latency goes from "
            f"{_fmt(row['result']['mean_e2el_ms'], 0)} ms to {_fmt(slowest['result']['mean_e2el_ms'], 0)} ms "
            f"({slowest['label']})")


def advice(rows: list[dict], axes: list[GridAxis], workload: Workload) -> str:
    """One line: the cheapest point within THROUGHPUT_TOLERANCE of the best throughput, and why.
    'Cheapest' is the smallest value of an amount, else the first in the grid's order."""
    ok = [row for row in ordered(rows, axes) if row["status"] == "ok"]
    failed = [row["label"] for row in rows if row["status"] != "ok"]
    failed_note = f" ({', '.join(failed)} did not run: see the table.)" if failed else ""
    if not ok:
        return "No point completed a benchmark." + failed_note
    best = max(ok, key=_throughput)
    chosen = next(row for row in ok if _throughput(row) >= (1.0 - THROUGHPUT_TOLERANCE) * _throughput(best))
    where = ("the best" if chosen is best else
             f"within {THROUGHPUT_TOLERANCE:.0%} of the best ({_throughput(best):.2f} req/s at {best['label']})")
    return (f"Use {chosen['label']}: {_throughput(chosen):.2f} req/s, {where}; "
            f"{bottleneck(chosen, ok, workload, is_ordinal(axes))}.{_smaller_note(ok[:ok.index(chosen)])}"
            f"{failed_note}")


def _smaller_note(smaller: list[dict]) -> str:
    """What held the smaller values back, when the server's /metrics said so."""
    notes = []
    for row in smaller:
        server = row["result"].get("server_metrics") or {}
        if (server.get("num_preemptions") or 0) > 0:
            notes.append(f"{row['label']} preempted {server['num_preemptions']:.0f} times")
        elif (server.get("peak_kv_cache_usage_pct") or 0) >= KV_BOUND_USAGE_PCT:
            notes.append(f"{row['label']} filled the KV cache")
    return f" Smaller values are KV-bound: {'; '.join(notes)}." if notes else ""


def _x_labels(rows: list[dict], axes: list[GridAxis]) -> list[str]:
    if len(axes) == 1:
        return [row["params"][axes[0].name] for row in rows]
    return [row["label"].replace(", ", "\n") for row in rows]


def _mark_failures(ax, rows: list[dict]) -> None:
    for x, row in enumerate(rows):
        if row["status"] != "ok":
            ax.scatter([x], [0], marker="x", color="red", s=80, zorder=3)
            ax.annotate("failed", (x, 0), textcoords="offset points", xytext=(0, 8), ha="center", color="red")


def _series(rows: list[dict], key: str) -> list[float]:
    nan = float("nan")
    return [row["result"][key] if row["status"] == "ok" and row["result"][key] is not None else nan for row in rows]


def plot_sweep(rows: list[dict], axes: list[GridAxis], workload: Workload, output_dir: Path) -> list[str]:
    """sweep-throughput.png and sweep-latency.png in output_dir; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ordered(rows, axes)
    xs, labels = list(range(len(rows))), _x_labels(rows, axes)
    xlabel = " x ".join(a.name for a in axes)
    output_dir.mkdir(parents=True, exist_ok=True)

    _plot_two_axes(plt, rows, xs, labels, xlabel, f"Throughput - {workload_caption(workload)}",
                   ("request_throughput", "requests/s", "request throughput (req/s)", "tab:blue"),
                   ("output_throughput", "output tokens/s", "output throughput (tok/s)", "tab:orange"),
                   output_dir / "sweep-throughput.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style, label in (("mean_ttft_ms", "o-", "mean TTFT"), ("p99_ttft_ms", "o:", "p99 TTFT"),
                              ("mean_e2el_ms", "s-", "mean end-to-end"), ("p99_e2el_ms", "s:", "p99 end-to-end")):
        ax.plot(xs, _series(rows, key), style, label=label)
    ax.set_ylabel("latency (ms)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="best", fontsize="small")
    _mark_failures(ax, rows)
    _finish(fig, ax, xs, labels, xlabel, f"Latency - {workload_caption(workload)}")
    fig.savefig(output_dir / "sweep-latency.png", dpi=PLOT_DPI)
    plt.close(fig)
    if not has_energy(rows):
        return ["sweep-throughput.png", "sweep-latency.png"]
    _plot_energy(plt, rows, xs, labels, xlabel, workload, output_dir)
    return ["sweep-throughput.png", "sweep-latency.png", "sweep-energy.png"]


def _plot_energy(plt, rows: list[dict], xs: list[int], labels: list[str], xlabel: str, workload: Workload,
                 output_dir: Path) -> None:
    """Joules per output token and mean power: FP8 against bf16 in energy as well as speed."""
    _plot_two_axes(plt, rows, xs, labels, xlabel, f"Energy - {workload_caption(workload)}",
                   ("joules_per_output_token", "J / output token", "joules per output token", "tab:green"),
                   ("mean_power_w", "mean power (W)", "mean GPU power (W)", "tab:red"),
                   output_dir / "sweep-energy.png")


def _plot_two_axes(plt, rows: list[dict], xs: list[int], labels: list[str], xlabel: str, title: str,
                   left: tuple[str, str, str, str], right: tuple[str, str, str, str], path: Path) -> None:
    """One series on the left axis, one on the right; each given as (key, legend, axis label, colour)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    twin = ax.twinx()
    for axis, (key, legend, axis_label, colour), style in ((ax, left, "o-"), (twin, right, "s--")):
        axis.plot(xs, _series(rows, key), style, color=colour, label=legend)
        axis.set_ylabel(axis_label, color=colour)
        axis.set_ylim(bottom=0)
    _mark_failures(ax, rows)
    _finish(fig, ax, xs, labels, xlabel, title)
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def _finish(fig, ax, xs: list[int], labels: list[str], xlabel: str, title: str) -> None:
    ax.set_xticks(xs, labels)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()


def write_markdown(path: Path, document: dict) -> None:
    w = document["workload"]
    machine = document["machine"]
    lines = [
        f"# fitserve sweep: {', '.join(document['grid'])}", "",
        f"- command: `{document['command_line']}`",
        f"- commit: `{document['commit']}`{' (with uncommitted changes)' if document['dirty'] else ''}",
        f"- machine: {machine['cpu']}, {machine['num_cpus']} CPUs{', ' + ', '.join(machine['gpus']) if machine['gpus'] else ''}",
        f"- server: `{document['server_command']}`",
        f"- workload: {w['name']} ({w['num_prompts']} requests, concurrency {w['max_concurrency'] or 'uncapped'}, "
        f"{w['input_len']} prompt / {w['output_len']} output tokens), {document['date']}",
        *[f"- {k}: {v}" for k, v in document["metadata"].items()],
        *([f"- table and plots redone by `{document['rendered_by']['command_line']}` at commit "
           f"`{document['rendered_by']['commit']}`"] if document.get("rendered_by") else []),
        "", document["table"], "", f"**Advice:** {document['advice']}", "",
        *[f"![{name}]({name})" for name in document["plots"]], "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
