"""The messages between the API process and the engine-core process (msgpack, via msgspec).

Towards the core: AddRequest, AbortRequests, Shutdown, and from the process that started several
API processes (--api-server-count), ClientGone when one of them died. Back from it, to each API
process on its own socket: CoreReady or CoreFailed
once at start-up, then one StepOutputs per engine step that produced outputs (every request's
increment of that step for the requests of that API process, in one message), RequestFailed for a request the core refused, and
CoreFailed if its loop dies. Each direction is one tagged union, so a reader decodes any
message with one typed decoder. The dataclasses inside (SamplingParams, RequestOutput,
EngineStats) travel as they are: msgspec encodes and rebuilds them field by field.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from fitserve.core.engine_stats import EngineStats
from fitserve.engine.outputs import RequestOutput
from fitserve.engine.request_limits import RequestLimits
from fitserve.sampling_params import SamplingParams


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time_s: float  # time.monotonic() in the API process (one clock for all processes on a host)
    client_index: int = 0  # which API process sent it: its outputs go back on that process's socket


class AbortRequests(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    """Stop stepping, release the runner, exit."""


class ClientGone(msgspec.Struct, tag=True, array_like=True):
    """API process `client_index` died: abort its requests, send it nothing more."""

    client_index: int


class StepOutputs(msgspec.Struct, tag=True, array_like=True):
    outputs: list[RequestOutput]
    # The core's stats after this step; sent with every step that finished a request, at most
    # STATS_INTERVAL_S apart otherwise, and when the core goes idle (None: unchanged).
    stats: EngineStats | None = None


class RequestFailed(msgspec.Struct, tag=True, array_like=True):
    """The core refused a request before running it: the client's fault (a grammar it cannot
    compile: HTTP 400, `message` is for the client) or, `internal`, the core's (HTTP 500, logged there),
    or, `overloaded`, the whole server's queue is full (HTTP 503; with several API processes only the
    core counts every request in flight)."""

    request_id: str
    message: str
    param: str | None = None
    internal: bool = False
    overloaded: bool = False


class CoreReady(msgspec.Struct, tag=True, array_like=True):
    """What the API process needs of the built engine (engine/client.py's EngineClient fields)."""

    model_name: str
    max_model_len: int
    max_logprobs: int
    max_num_seqs: int
    request_limits: RequestLimits  # the API process checks each request against them before sending it
    default_sampling_params: dict[str, Any]
    startup_info: dict[str, Any] | None
    gpu_ids: list[Union[str, int]]  # the GPUs the engine uses, for telemetry (startup.gpu_ids_in_use)
    stats: EngineStats


class CoreFailed(msgspec.Struct, tag=True, array_like=True):
    """The core could not start (`config_error`: the operator's setting, exit code 2) or its loop died."""

    message: str
    config_error: bool = False


ToCore = Union[AddRequest, AbortRequests, Shutdown, ClientGone]
FromCore = Union[StepOutputs, RequestFailed, CoreReady, CoreFailed]


def to_core_codec() -> tuple[msgspec.msgpack.Encoder, msgspec.msgpack.Decoder]:
    return msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ToCore)


def from_core_codec() -> tuple[msgspec.msgpack.Encoder, msgspec.msgpack.Decoder]:
    return msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(FromCore)
