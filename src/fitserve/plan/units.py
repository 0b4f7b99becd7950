"""How the planner writes sizes for people."""

from __future__ import annotations

GIB = 1 << 30
MIB = 1 << 20


def gib(num_bytes: int | float) -> str:
    """12884901888 -> '12.00 GiB'."""
    return f"{num_bytes / GIB:.2f} GiB"
