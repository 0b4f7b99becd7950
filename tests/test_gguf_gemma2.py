"""Gemma 2 GGUF files (`gemma2`): a tiny transformers Gemma 2 written with the gguf package's writer as
llama.cpp's converter lays it out (norms stored as 1 + w, tied lm_head left out; tests/gguf_writer.py),
with soft-caps small enough to bite and a window shorter than the prompts, loaded through fitserve and
compared with transformers' Gemma2ForCausalLM loading the same file, through the paged cache (float32
logits within hf_compare_helpers.LOGITS_TOL, greedy tokens fed back equal). transformers' GGUF reader
takes the window from the file but leaves the soft-caps and the query scale at Gemma2Config's defaults
(50, 30, 256), so the test sets them: the file's soft-caps, and the head size that llama.cpp scales by.
"""

from __future__ import annotations

import gguf
import torch
import transformers
from gguf_writer import add_common_header, gguf_tensors, randomize, transformers_from_gguf, write_gguf
from hf_compare_helpers import check_prefill_and_decode

from fitserve.config import EngineConfig
from fitserve.layers.formats.gguf import GgufLinear
from fitserve.models.loader import load_model
from fitserve.weights.source import resolve_model_source
from paged_helpers import PagedDriver

WINDOW = 5  # tokens: the local layers (0, 2) see fewer positions than the prompts hold
ATTN_SOFTCAP, FINAL_SOFTCAP = 5.0, 3.0  # not Gemma2Config's 50 and 30: the file's keys must be read
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, max_position_embeddings=256, rms_norm_eps=1e-6,
            query_pre_attn_scalar=24, sliding_window=WINDOW, attn_logit_softcapping=ATTN_SOFTCAP,
            final_logit_softcapping=FINAL_SOFTCAP, bos_token_id=1, eos_token_id=95, pad_token_id=0)
PROMPTS = [[5, 17, 81, 44, 9, 50, 3], list(range(3, 60, 3))]
CPU = torch.device("cpu")


def tiny_gemma2() -> transformers.Gemma2ForCausalLM:
    torch.manual_seed(0)
    hf = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**TINY))
    with torch.no_grad():  # logits of a few units, so the final soft-cap of 3 changes them
        hf.model.embed_tokens.weight.normal_(0.0, 0.5)
    return randomize(hf)


def write_gemma2_file(path, hf, quantized: bool = False, half: bool = False) -> None:
    cfg = hf.config

    def header(writer: gguf.GGUFWriter) -> None:
        add_common_header(writer, cfg)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_sliding_window(WINDOW)
        writer.add_attn_logit_softcapping(ATTN_SOFTCAP)
        writer.add_final_logit_softcapping(FINAL_SOFTCAP)

    tensors = gguf_tensors(hf, gguf.MODEL_ARCH.GEMMA2)
    assert "output.weight" not in tensors and "blk.0.post_ffw_norm.weight" in tensors
    write_gguf(path, "gemma2", tensors, header, tokenizer="llama",
               quantized=lambda n: quantized and n.startswith("blk.") and "norm" not in n,
               half=lambda n: half and "norm" not in n)  # F16 as llama.cpp's converter stores matrices


def test_a_gemma2_file_matches_transformers_loading_it(tmp_path):
    hf = tiny_gemma2()
    path = tmp_path / "tiny-gemma2.gguf"
    write_gemma2_file(path, hf, half=True)  # F16 matrices, F32 norms
    source = resolve_model_source(EngineConfig(model=str(path)))
    arch = source.arch
    assert (arch.architecture, arch.head_dim, arch.query_pre_attn_scalar) == ("Gemma2ForCausalLM", 24, 24.0)
    assert (arch.attn_logit_softcap, arch.final_logit_softcap) == (ATTN_SOFTCAP, FINAL_SOFTCAP)
    assert [arch.layer_window(i) for i in range(4)] == [WINDOW, None, WINDOW, None]  # local from layer 0
    assert arch.tie_word_embeddings and 95 in arch.eos_token_ids
    ours = load_model(source, torch.float32, CPU, progress=False)
    held, stored = ours.layers[1].post_feedforward_layernorm.weight, hf.model.layers[1].post_feedforward_layernorm
    torch.testing.assert_close(held, stored.weight, rtol=0, atol=1e-6)  # the file's 1 + w back to w
    reference = transformers_from_gguf(path, transformers.Gemma2ForCausalLM, attn_logit_softcapping=ATTN_SOFTCAP,
                                       final_logit_softcapping=FINAL_SOFTCAP, query_pre_attn_scalar=24)
    assert reference.config.sliding_window == WINDOW
    check_prefill_and_decode(ours, reference, prompts=PROMPTS)


def test_gemma2_projections_kept_packed_equal_dequantized(tmp_path):
    path = tmp_path / "tiny-gemma2-q8.gguf"
    write_gemma2_file(path, tiny_gemma2(), quantized=True)
    source = resolve_model_source(EngineConfig(model=str(path)))
    logits = []
    for quantization in (None, "gguf"):
        model = load_model(source, torch.float32, CPU, progress=False, quantization=quantization)
        assert len([m for m in model.modules() if isinstance(m, GgufLinear)]) == (0 if quantization is None else 16)
        logits.append(PagedDriver(model, num_blocks=8, block_size=16).step([("a", PROMPTS[1])]))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
