"""Qwen2, Qwen3 and Phi-3 under tensor parallelism on the CPU (gloo): two ranks, each with its
slice of the biases (Qwen2), whole q/k norms (Qwen3) or its rows of the fused tensors (Phi-3),
give one rank's greedy tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

from fitserve.models.phi3 import Phi3ForCausalLM
from fitserve.models.qwen2 import Qwen2ForCausalLM
from fitserve.models.qwen3 import Qwen3ForCausalLM
from hf_compare_helpers import save_random_checkpoint
from tp_helpers import TINY_LLAMA, greedy_tokens, tiny_llm

ARCHITECTURES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, Qwen3ForCausalLM, {"head_dim": 32}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, Phi3ForCausalLM, {"pad_token_id": 0}),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_tp2_greedy_tokens_equal_tp1(tmp_path, name):
    config_class, hf_class, our_class, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    save_random_checkpoint(tmp_path, hf_class(config_class(**TINY_LLAMA, **extra)).eval())
    with tiny_llm(tmp_path, 1) as llm:
        tp1 = greedy_tokens(llm)
    with tiny_llm(tmp_path, 2) as llm:
        model = llm.engine.runner.model
        assert isinstance(model, our_class) and model.arch.num_key_value_heads == 1
        assert greedy_tokens(llm) == tp1
