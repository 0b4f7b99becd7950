"""Shared pytest set-up. Server fixtures live in server_fixtures.py; add others below."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# OpenMP's threads sleep between ops in the tests (and the servers they start): two xdist workers and
# their servers share the cores, where fitserve's default short spin (fitserve/__init__.py) only takes
# cores from each other. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Tests run against the source tree without an install.
_SRC = str(Path(__file__).resolve().parents[1] / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from server_fixtures import api_server, async_client_factory, client  # noqa: E402,F401

# The tests' engines (and the servers they start, which inherit the environment) decode eagerly: with
# --cpu-compile's default, auto, each would spawn a child building its AOTInductor package.
# tests/test_cpu_aot.py asks for the package where it tests it, and checks what auto resolves to.
from fitserve.config import CPU_COMPILE_ENV  # noqa: E402

os.environ.setdefault(CPU_COMPILE_ENV, "off")

import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist's `--dist loadgroup` (the README's test command runs two workers), each
    test file runs whole on one worker, so its module fixtures (servers, loaded models) start once;
    files that mark a group of their own (the two that start Ray) share a worker. Without xdist the
    marks do nothing."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
