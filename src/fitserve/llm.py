"""The offline API: batch generation on the same engine the server uses (built by startup.py).

    from fitserve.llm import LLM
    from fitserve.sampling_params import SamplingParams
    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
    print(outs[0].text)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig
from fitserve.sampling_params import SamplingParams
from fitserve.startup import build_engine


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None


def engine_config(model: str | None, fields: dict[str, object]) -> EngineConfig:
    """An EngineConfig from flat keyword settings; CacheConfig and SchedulerConfig fields go to them."""
    fields, nested = dict(fields), {}
    for name, part in (("cache", CacheConfig), ("scheduler", SchedulerConfig)):
        own = {key: fields.pop(key) for key in [k for k in fields if k in part.__dataclass_fields__]}
        if own:
            nested[name] = part(**own)
    return EngineConfig(model=model, **nested, **fields)


class LLM:
    """Offline batch generation on the same engine the server uses."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **config_fields: object) -> None:
        """LLM("path") or LLM(dtype="float32", enable_prefix_caching=False) build an EngineConfig
        (cache and scheduler settings by their own names, as vLLM's LLM takes them flat);
        LLM(config=...) takes one whole."""
        if config is None:
            config = engine_config(model, config_fields)
        elif model is not None or config_fields:
            raise TypeError("pass either config= or model and EngineConfig fields, not both")
        if config.cpu_compile == "auto":
            # auto's package builder is a spawned process, which imports the caller's script again: a script
            # without an `if __name__ == "__main__":` guard would run twice. Offline, the package is asked for
            # by name (cpu_compile="aot"), from a guarded script.
            config = replace(config, cpu_compile="off")
        built = build_engine(config, progress=False)
        self.engine = built.engine
        self.tokenizer = built.tokenizer
        self.default_sampling_params = built.default_sampling_params or {}

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (they also stop when this process exits)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def generate(
        self, prompts: list[str] | list[list[int]] | str, params: SamplingParams | None = None
    ) -> list[CompletionOutput]:
        """Run every prompt (text, or token ids) to completion, batched; results in prompt order."""
        params = params or SamplingParams(**self.default_sampling_params)  # type: ignore[arg-type]
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        requests = []
        for prompt in prompt_list:
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request = self.engine.make_request(uuid.uuid4().hex, token_ids, params)
            self.engine.add_request(request)
            requests.append(request)
        tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
        texts: dict[str, list[str]] = {r.request_id: [] for r in requests}
        finish: dict[str, str | None] = {}
        while self.engine.has_unfinished:
            for output in self.engine.step():
                tokens[output.request_id].extend(output.new_token_ids)
                texts[output.request_id].append(output.new_text)
                if output.finished:
                    finish[output.request_id] = output.finish_reason
        return [
            CompletionOutput(
                r.prompt_token_ids, tuple(tokens[r.request_id]), "".join(texts[r.request_id]), finish.get(r.request_id)
            )
            for r in requests
        ]
