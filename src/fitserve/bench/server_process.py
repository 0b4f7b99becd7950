"""A server started for one sweep point: a subprocess in its own session, its output in a log
file, /health polled until it answers, and its failure kept as text rather than raised."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HEALTH_POLL_INTERVAL_S = 0.25
STOP_GRACE_S = 20.0          # SIGINT lets uvicorn drain; after this the process group is killed
MAX_ERROR_PARAGRAPH_CHARS = 2000
# fitserve's start-up line: "KV cache: 46592 tokens (...); maximum concurrency at --max-model-len 8192: 5.69x"
KV_TOKENS_RE = re.compile(r"KV cache: (\d+) tokens")
MAX_CONCURRENCY_RE = re.compile(r"maximum concurrency at --max-model-len \d+: ([\d.]+)x")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def error_paragraph(log_text: str) -> str:
    """The last paragraph of a failed server's output: fitserve's one-paragraph error, or the
    end of a traceback. Progress-bar lines (carriage returns) are left out."""
    lines = [line for line in log_text.splitlines() if "\r" not in line]
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            paragraphs[-1].append(line.rstrip())
        elif paragraphs[-1]:
            paragraphs.append([])
    non_empty = [p for p in paragraphs if p]
    text = "\n".join(non_empty[-1]) if non_empty else ""
    return text[-MAX_ERROR_PARAGRAPH_CHARS:]


@dataclass(frozen=True, slots=True)
class StartResult:
    ready: bool
    startup_s: float                # start -> /health answered (or -> the failure)
    exit_code: int | None = None    # when the process ended during start-up
    error: str = ""                 # the server's error paragraph, or why it was given up
    kv_cache_tokens: int | None = None          # from fitserve's start-up line, when present
    max_concurrency_at_max_model_len: float | None = None


class ServerProcess:
    def __init__(self, command: list[str], log_path: Path, port: int):
        self.command, self.log_path, self.port = command, log_path, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> StartResult:
        start_s = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        while True:
            elapsed_s = time.monotonic() - start_s
            exit_code = self.process.poll()
            if exit_code is not None:
                return StartResult(False, elapsed_s, exit_code, error_paragraph(self.log_text()))
            if self._healthy():
                return self._started(elapsed_s)
            if elapsed_s > timeout_s:
                self.stop()
                return StartResult(False, elapsed_s, None, f"/health did not answer within {timeout_s:g} s")
            time.sleep(HEALTH_POLL_INTERVAL_S)

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _started(self, elapsed_s: float) -> StartResult:
        log = self.log_text()
        kv = KV_TOKENS_RE.search(log)
        conc = MAX_CONCURRENCY_RE.search(log)
        return StartResult(True, elapsed_s, kv_cache_tokens=int(kv.group(1)) if kv else None,
                           max_concurrency_at_max_model_len=float(conc.group(1)) if conc else None)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGINT, then SIGKILL to its process group after STOP_GRACE_S; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: only what it started
            return self.process.wait()
