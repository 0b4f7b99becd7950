"""How the HTTP layer sees the engine. `AsyncEngine` implements it; tests may fake it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from fitserve.engine.outputs import RequestOutput
from fitserve.sampling_params import SamplingParams


class EngineClient(Protocol):
    model_name: str  # the name clients put in the `model` field
    max_model_len: int  # prompt + output tokens a request may reach

    @property
    def tokenizer(self) -> Any:  # fitserve.engine.tokenizer.Tokenizer
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

    def stats(self) -> dict[str, Any]: ...
