"""`launcher.serve` over the fake-runner engine, as a process: python fake_serve_main.py PORT CONFIG_JSON STEP_S.

For tests that need a real process (signals, exit codes) but not the real model."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from reliability_helpers import make_engine  # noqa: E402

from fitserve.config import ServerConfig  # noqa: E402
from fitserve.server import launcher  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    port, config, step_delay_s = int(sys.argv[1]), ServerConfig(**json.loads(sys.argv[2])), float(sys.argv[3])
    sys.exit(launcher.serve(config, "127.0.0.1", port, lambda report_phase: make_engine(step_delay_s=step_delay_s)))
