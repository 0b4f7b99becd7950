"""POST /tokenize and /detokenize, with vLLM's request and response shapes.

/tokenize takes a `prompt` (encoded as /v1/completions would, BOS per `add_special_tokens`) or
`messages` (rendered as /v1/chat/completions would, tools included), and answers
`{count, max_model_len, tokens}` (plus `token_strs` when asked). /detokenize takes `tokens` and
answers `{prompt}`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fitserve.server.chat_tools import ToolPlan, chat_prompt_ids
from fitserve.server.errors import BadRequestError
from fitserve.server.protocol import Bool, ChatMessage, check_prompt_end, check_text
from fitserve.server.protocol_tools import ChatTool
from fitserve.server.serving_common import ServingBase

TokenId = Annotated[int, Field(ge=0, le=2**63 - 1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: Bool | None = None  # default: True for `prompt`; with `messages` the template writes them
    add_generation_prompt: Bool = True  # messages only
    continue_final_message: Bool = False  # messages only
    tools: list[ChatTool] | None = None  # messages only: offered as with tool_choice "auto"
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: Bool = False

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        return check_text(data)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("Send exactly one of `prompt` and `messages`.")
        if self.messages is not None and self.add_special_tokens:
            raise ValueError("`add_special_tokens` cannot be true with `messages`: the chat template writes the "
                             "model's special tokens.")
        check_prompt_end(self.add_generation_prompt, self.continue_final_message)
        return self


class TokenizeResponse(_Model):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(_Model):
    prompt: str


class OpenAIServingTokenization(ServingBase):
    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.check_model(body.model)
        return await self.off_loop(self._tokenize, body)  # a huge prompt must not hold the event loop

    def _tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        tokenizer = self.engine.tokenizer
        if body.messages is not None:
            plan = ToolPlan(tuple(body.tools or ()), "auto")
            token_ids = chat_prompt_ids(tokenizer, body.messages, plan, body.add_generation_prompt,
                                        body.chat_template_kwargs, body.continue_final_message)
        else:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            token_ids = list(tokenizer.encode(body.prompt or "", add_special_tokens=add_special))
        token_strs = list(tokenizer.convert_ids_to_tokens(token_ids)) if body.return_token_strs else None
        return TokenizeResponse(count=len(token_ids), max_model_len=self.engine.max_model_len, tokens=token_ids,
                                token_strs=token_strs)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        tokenizer = self.engine.tokenizer
        vocab_size = tokenizer.vocab_size
        bad = next((t for t in body.tokens if t >= vocab_size), None)
        if bad is not None:
            raise BadRequestError(f"Token id {bad} is out of vocabulary (valid ids: 0 to {vocab_size - 1}).",
                                  param="tokens")
        prompt = await self.off_loop(tokenizer.decode, list(body.tokens), False)
        return DetokenizeResponse(prompt=prompt)
