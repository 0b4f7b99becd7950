"""vLLM `serve` flags that fitserve takes without effect, or only at the value that means what
fitserve does, so that a deployment's vLLM command line (a Kubernetes manifest, a compose file)
starts fitserve unchanged, or stops with the reason, never with argparse's "unrecognized arguments".

Each one given is logged once at start-up with why it changes nothing. A flag with `only` values
is refused (exit 2) at any other value: `--pipeline-parallel-size 2` asks for what fitserve cannot
do, and silence would hide it. Flags that fitserve implements are in config.py, not here.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from fitserve.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VllmFlag:
    name: str
    takes_value: bool
    note: str  # why it changes nothing here
    only: tuple[str, ...] = ()  # the values accepted (for a flag that takes one); others are refused

    @property
    def dest(self) -> str:
        return "vllm_" + self.name.removeprefix("--").replace("-", "_")


VLLM_FLAGS = (
    VllmFlag("--trust-remote-code", False, "fitserve runs no code from the hub: its architectures are built in "
             "(docs/models.md)"),
    VllmFlag("--enable-chunked-prefill", False, "chunked prefill is always on"),
    VllmFlag("--disable-log-requests", False, "prompts are logged only with --enable-log-requests"),
    VllmFlag("--swap-space", True, "a preempted request is recomputed, never swapped to host memory"),
    VllmFlag("--max-seq-len-to-capture", True, "the CUDA graphs serve decode steps of any context length"),
    VllmFlag("--uvicorn-log-level", True, "--log-level sets every logger"),
    VllmFlag("--disable-uvicorn-access-log", False, "no access log is written"),
    VllmFlag("--distributed-executor-backend", True, "--tensor-parallel-size starts its own worker processes"),
    VllmFlag("--disable-custom-all-reduce", False, "tensor parallelism all-reduces through NCCL"),
    VllmFlag("--max-parallel-loading-workers", True, "the weights load in one pass"),
    VllmFlag("--disable-frontend-multiprocessing", False, "the split is --engine-process's (docs/engine_process.md)"),
    VllmFlag("--tokenizer-mode", True, "the model's fast tokenizer is used", only=("auto", "hf")),
    VllmFlag("--pipeline-parallel-size", True, "pipeline parallelism is not supported; --tensor-parallel-size is",
             only=("1",)),
    VllmFlag("--response-role", True, "replies come from the `assistant` role", only=("assistant",)),
)


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM flags taken without effect (docs/deploy.md)")
    for flag in VLLM_FLAGS:
        help_text = f"vLLM's; {flag.note}" + (f" (only {', '.join(flag.only)})" if flag.only else "")
        if flag.takes_value:
            group.add_argument(flag.name, dest=flag.dest, default=None, metavar="VALUE", help=help_text)
        else:
            group.add_argument(flag.name, dest=flag.dest, action="store_true", help=help_text)


def check_vllm_flags(args: argparse.Namespace) -> list[str]:
    """The vLLM flags given, each logged with why it changes nothing; ConfigError for a refused value."""
    given = []
    for flag in VLLM_FLAGS:
        value = getattr(args, flag.dest, None)
        if value is None or value is False:
            continue
        if flag.only and value not in flag.only:
            raise ConfigError(f"{flag.name} {value}: {flag.note}; fitserve takes it only as {' or '.join(flag.only)}.")
        logger.info("%s is vLLM's flag and changes nothing here: %s.", flag.name, flag.note)
        given.append(flag.name)
    return given
