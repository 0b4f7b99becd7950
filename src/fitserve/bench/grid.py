"""`fitserve sweep --grid`: the grid of server flags and its points (plain data, no I/O)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from fitserve.bench.client import BenchError

DEFAULT_VALUE = "default"   # a grid value that leaves the flag out: the server's own default


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
