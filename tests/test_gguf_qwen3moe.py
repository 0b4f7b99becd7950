"""Qwen3-MoE GGUF files (`qwen3moe`): a tiny transformers Qwen3-MoE written with the gguf package's writer
as llama.cpp's converter lays it out (q/k norms, a router ffn_gate_inp and stacked ffn_*_exps tensors;
tests/gguf_writer.py), loaded through fitserve and compared with transformers' Qwen3MoeForCausalLM loading
the same file, through the paged cache (float32 logits within hf_compare_helpers.LOGITS_TOL, greedy tokens
fed back equal). transformers' GGUF reader leaves moe_intermediate_size at its config default (768), so
the test sets it to the file's `qwen3moe.expert_feed_forward_length`.
"""

from __future__ import annotations

import gguf
import torch
import transformers
from gguf_writer import add_common_header, gguf_tensors, randomize, transformers_from_gguf, write_gguf
from hf_compare_helpers import check_prefill_and_decode

from fitserve.config import EngineConfig
from fitserve.layers.formats.gguf import GgufLinear
from fitserve.layers.moe import MoE
from fitserve.models.loader import load_model
from fitserve.weights.source import resolve_model_source
from paged_helpers import PagedDriver

NUM_EXPERTS, EXPERT_COLUMNS = 6, 64  # Q8_0 blocks are 32 wide: down_exps rows hold 64
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
            num_experts=NUM_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=EXPERT_COLUMNS,
            norm_topk_prob=True, mlp_only_layers=[], tie_word_embeddings=False, bos_token_id=1, eos_token_id=95)
PROMPTS = [[5, 17, 81, 44, 9, 50, 3], list(range(3, 60, 3))]
CPU = torch.device("cpu")


def tiny_qwen3moe() -> transformers.Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    return randomize(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**TINY)))


def write_qwen3moe_file(path, hf, quantized: bool = False) -> None:
    cfg = hf.config

    def header(writer: gguf.GGUFWriter) -> None:
        add_common_header(writer, cfg)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_expert_count(NUM_EXPERTS)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(EXPERT_COLUMNS)

    tensors = gguf_tensors(hf, gguf.MODEL_ARCH.QWEN3MOE)
    assert tensors["blk.1.ffn_down_exps.weight"].shape == (NUM_EXPERTS, 64, EXPERT_COLUMNS)
    write_gguf(path, "qwen3moe", tensors, header,
               quantized=lambda n: quantized and n.startswith("blk.") and "norm" not in n and "ffn_gate_inp" not in n)


def test_a_qwen3moe_file_matches_transformers_loading_it(tmp_path):
    hf = tiny_qwen3moe()
    path = tmp_path / "tiny-qwen3moe.gguf"
    write_qwen3moe_file(path, hf)
    arch = resolve_model_source(EngineConfig(model=str(path))).arch
    assert (arch.architecture, arch.head_dim, arch.qk_norm) == ("Qwen3MoeForCausalLM", 32, True)
    assert (arch.num_experts, arch.num_experts_per_tok, arch.moe_intermediate_size, arch.norm_topk_prob) == (
        NUM_EXPERTS, 2, EXPERT_COLUMNS, True)
    ours = load_model(resolve_model_source(EngineConfig(model=str(path))), torch.float32, CPU, progress=False)
    assert all(isinstance(layer.mlp, MoE) for layer in ours.layers)
    reference = transformers_from_gguf(path, transformers.Qwen3MoeForCausalLM, moe_intermediate_size=EXPERT_COLUMNS)
    assert reference.config.norm_topk_prob  # transformers' GGUF default, as llama.cpp routes
    check_prefill_and_decode(ours, reference, prompts=PROMPTS)


def test_quantized_experts_are_dequantized_and_attention_kept_packed(tmp_path):
    """Q8_0 attention and experts: dequantized at load (the stacked experts as 3-D blocks) they give
    transformers' logits on the same file; --quantization gguf keeps the attention projections packed and
    dequantizes the experts, with the same logits."""
    path = tmp_path / "tiny-qwen3moe-q8.gguf"
    write_qwen3moe_file(path, tiny_qwen3moe(), quantized=True)
    source = resolve_model_source(EngineConfig(model=str(path)))
    logits = []
    for quantization in (None, "gguf"):
        model = load_model(source, torch.float32, CPU, progress=False, quantization=quantization)
        assert len([m for m in model.modules() if isinstance(m, GgufLinear)]) == (0 if quantization is None else 4)
        logits.append(PagedDriver(model, num_blocks=8, block_size=16).step([("a", PROMPTS[1])]))
        if quantization is None:
            reference = transformers_from_gguf(path, transformers.Qwen3MoeForCausalLM,
                                               moe_intermediate_size=EXPERT_COLUMNS)
            check_prefill_and_decode(model, reference, prompts=PROMPTS[:1], num_decode_steps=1)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
