"""Shared pytest set-up. Server fixtures live in server_fixtures.py; add others below."""

from __future__ import annotations

import sys
from pathlib import Path

# Tests run against the source tree without an install.
_SRC = str(Path(__file__).resolve().parents[1] / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from server_fixtures import api_server, async_client_factory, client  # noqa: E402,F401
