"""How the HTTP layer, the launcher and the telemetry see the engine. `AsyncEngine` implements
it; tests fake it (tests/fake_engine.py). Everything the server reads of the engine is declared
here, so another implementation (the engine in its own process, say) knows what to provide."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from fitserve.core.engine_stats import EngineStats
from fitserve.engine.outputs import RequestOutput
from fitserve.sampling_params import SamplingParams


class ServingTokenizer(Protocol):
    """What the server uses of the model's tokenizer (engine/tokenizer.py `Tokenizer`)."""

    eos_token_id: int | None

    @property
    def chat_template(self) -> str | None:  # the model's own Jinja template (None: it has none)
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...

    def token_bytes(self, token_id: int) -> list[int]:
        """One token's raw bytes (a piece may be part of a UTF-8 character)."""
        ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> list[int]: ...


@runtime_checkable
class EngineClient(Protocol):
    model_name: str  # the name clients put in the `model` field
    max_model_len: int  # prompt + output tokens a request may reach
    max_logprobs: int  # most (top) logprobs a request may ask for per token (--max-logprobs)
    max_num_in_flight: int | None  # requests it holds at once, running and queued; None: no bound
    # The model's generation_config.json defaults (SamplingParams field -> value) for fields a
    # request leaves unset; empty with --generation-config vllm.
    default_sampling_params: dict[str, Any]
    # The settings and memory plan the page shows (server/ui/info.py `startup_info`); None when
    # whoever built the engine recorded none.
    startup_info: dict[str, Any] | None

    @property
    def tokenizer(self) -> ServingTokenizer:
        ...

    @property
    def num_requests_in_flight(self) -> int:
        """Requests accepted and not yet finished or aborted."""
        ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; the last has finished=True.

        Raises InvalidRequestError before the first output when the request cannot run
        (prompt too long, max_tokens past the context). Closing the iterator early (the
        client went away) aborts the request and frees its KV blocks.
        """
        ...

    async def abort(self, request_id: str) -> None: ...

    def is_healthy(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None:
        """Stop serving and release the engine's threads and processes; idempotent."""
        ...
