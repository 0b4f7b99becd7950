"""Live processes read from /proc (Linux), for the tests that check no process outlives its parent."""

from __future__ import annotations

import os
from pathlib import Path


def child_pids(pid: int) -> set[int]:
    """Live child processes of `pid`, read from /proc (Linux)."""
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(entry))
    return children


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
