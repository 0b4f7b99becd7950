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


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds open."""
    inodes = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def tcp_ports(pid: int) -> tuple[set[int], set[int]]:
    """(local ports, remote ports) of the TCP sockets process `pid` holds: a server process's remote
    ports are its clients' local ports, so a test can tell which process serves its connection."""
    inodes = socket_inodes(pid)
    local, remote = set(), set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[9]) in inodes:
                local.add(int(fields[1].rsplit(":", 1)[1], 16))
                remote.add(int(fields[2].rsplit(":", 1)[1], 16))
    return local, remote
