"""Mixtral and Qwen3-MoE under tensor parallelism on the CPU (gloo): each rank holds every expert's
slice of the intermediate columns (and the whole router); two ranks give one rank's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from fitserve.config import ConfigError, EngineConfig
from fitserve.layers.parallel import TensorParallel
from fitserve.models.mixtral import MixtralForCausalLM
from fitserve.weights.loader import safetensors_weights
from fitserve.weights.source import resolve_model_source
from moe_helpers import MODELS, write_moe_checkpoint
from tp_helpers import greedy_tokens, tiny_llm


@pytest.mark.parametrize("name", list(MODELS))
def test_tp2_greedy_tokens_equal_tp1(tmp_path, name):
    write_moe_checkpoint(tmp_path, name)
    with tiny_llm(tmp_path, 1) as llm:
        tp1 = greedy_tokens(llm)
    with tiny_llm(tmp_path, 2) as llm:
        moe = llm.engine.runner.model.layers[0].mlp
        assert moe.intermediate_size == llm.engine.runner.model.full_arch.moe_intermediate_size // 2
        assert greedy_tokens(llm) == tp1


@pytest.mark.parametrize("whole", [True, False])  # handed whole, or read as the rank's slice
def test_a_rank_holds_its_columns_of_every_expert(tmp_path, whole):
    hf = write_moe_checkpoint(tmp_path, "mixtral")
    source = resolve_model_source(EngineConfig(model=str(tmp_path)))
    rank1 = MixtralForCausalLM(source.arch, torch.float32, torch.device("cpu"), tp=TensorParallel(rank=1, size=2))
    state = hf.state_dict()  # transformers 5 holds the experts fused: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    weights = safetensors_weights(str(tmp_path), rank1.checkpoint_slice)
    if whole:
        from safetensors.torch import load_file
        weights = load_file(str(tmp_path / "model.safetensors")).items()
    rank1.load_weights(weights)
    moe = rank1.layers[1].mlp
    gate, up = state["model.layers.1.mlp.experts.gate_up_proj"].chunk(2, dim=1)
    torch.testing.assert_close(moe.w13, torch.cat([gate.chunk(2, dim=1)[1], up.chunk(2, dim=1)[1]], dim=1),
                               rtol=0, atol=0)
    torch.testing.assert_close(moe.w2, state["model.layers.1.mlp.experts.down_proj"].chunk(2, dim=2)[1],
                               rtol=0, atol=0)
    torch.testing.assert_close(moe.router, state["model.layers.1.mlp.gate.weight"], rtol=0, atol=0)


def test_a_size_that_does_not_divide_the_experts_columns_is_refused(tmp_path):
    write_moe_checkpoint(tmp_path, "qwen3_moe", moe_intermediate_size=49)  # the heads split in 2, the experts not
    arch = resolve_model_source(EngineConfig(model=str(tmp_path))).arch
    with pytest.raises(ConfigError, match="divide this model's moe_intermediate_size = 49:"):
        arch.shard(2)
