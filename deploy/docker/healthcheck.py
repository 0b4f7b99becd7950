#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 when GET /health on the server's port answers 200, else 1.

The port is the one the entrypoint saw in --port (written to /tmp/fitserve-port), else 8000.
/health is open even with --api-key, and answers 503 while the model loads or after the engine died.
"""

import sys
import urllib.error
import urllib.request

DEFAULT_PORT = 8000
PORT_FILE = "/tmp/fitserve-port"
TIMEOUT_S = 4  # under the HEALTHCHECK --timeout, so that a hung server reads as unhealthy, not as a killed check


def main() -> int:
    try:
        with open(PORT_FILE, encoding="ascii") as f:
            port = int(f.read().strip())
    except (OSError, ValueError):
        port = DEFAULT_PORT
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=TIMEOUT_S) as reply:
            return 0 if reply.status == 200 else 1
    except (urllib.error.URLError, OSError) as error:
        print(f"fitserve-healthcheck: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
