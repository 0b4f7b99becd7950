"""Our Llama matches Hugging Face transformers on the same weights (float32, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers.initialization import no_init_weights

from fitserve.arch_config import ArchConfig
from fitserve.config import EngineConfig
from fitserve.models.loader import load_model
from fitserve.weights.loader import gguf_weights
from fitserve.weights.source import resolve_model_source
from paged_helpers import PagedDriver

LOGITS_ATOL = 2e-3  # float32, different summation orders over 30 layers


def hf_config(arch: ArchConfig) -> transformers.LlamaConfig:
    rope_scaling = None
    if arch.rope_scaling is not None:
        s = arch.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                        "high_freq_factor": s.high_freq_factor,
                        "original_max_position_embeddings": s.original_max_position_embeddings}
    rope_parameters = {"rope_type": "default", "rope_theta": arch.rope_theta, **(rope_scaling or {})}
    return transformers.LlamaConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, head_dim=arch.head_dim, rms_norm_eps=arch.rms_norm_eps,
        rope_parameters=rope_parameters, max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings, bos_token_id=arch.bos_token_id,
        eos_token_id=list(arch.eos_token_ids) or None, pad_token_id=None,
    )


@pytest.fixture(scope="module")
def smol():
    """(our model, HF model) on the embedded GGUF's dequantized weights, float32."""
    source = resolve_model_source(EngineConfig())
    ours = load_model(source, torch.float32, torch.device("cpu"), progress=False)
    with no_init_weights():  # random init of 135M parameters would cost seconds
        hf = transformers.LlamaForCausalLM(hf_config(source.arch)).eval()
    state = {name: t for name, t in gguf_weights(source)}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like our driver
    return ours, hf


def hf_last_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()  # [L, vocab]


PROMPTS = [
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2],
    [504, 3458, 282, 4649, 314],
    [19556, 905, 216, 33, 34, 35, 36, 37, 30, 1691, 4, 2040, 339],
    [1, 4093, 198, 1780, 314, 216, 34, 31, 34, 47, 2, 198, 1, 520, 9531, 198],
    [378, 2701, 3558, 1420, 16760, 690, 260, 23790, 2767, 30, 378],
]


@pytest.mark.slow
def test_mixed_batch_and_chunked_prefill_match_hf(smol):
    ours, hf = smol
    driver = PagedDriver(ours, num_blocks=64, block_size=4)
    a, b = PROMPTS[0], PROMPTS[2]
    # step 1: all of a, first 5 tokens of b; step 2: a decodes one token while b finishes its prefill
    logits1 = driver.step([("a", a), ("b", b[:5])], num_pad_rows=3)
    next_a = int(logits1[0].argmax())
    logits2 = driver.step([("a", [next_a]), ("b", b[5:])])
    ref_a = hf_last_logits(hf, a + [next_a])
    ref_b = hf_last_logits(hf, b)
    torch.testing.assert_close(logits1[0], ref_a[len(a) - 1], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(logits1[1], ref_b[4], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(logits2[0], ref_a[-1], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(logits2[1], ref_b[-1], atol=LOGITS_ATOL, rtol=0)


@pytest.mark.slow
def test_greedy_generation_matches_hf_generate(smol):
    ours, hf = smol
    max_new_tokens = 24
    driver = PagedDriver(ours, num_blocks=128, block_size=8)
    got = driver.greedy({str(i): p for i, p in enumerate(PROMPTS)}, max_new_tokens)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        assert got[str(i)] == ref[0, len(prompt):].tolist(), f"prompt {i}"


def tiny_hf_checkpoint(tmp_path, rope_scaling: dict | None = None, tied: bool = False):
    config = transformers.LlamaConfig(
        vocab_size=311, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=1,
        eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0, **(rope_scaling or {})},
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    return hf


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}])
def test_safetensors_checkpoint_matches_hf(tmp_path, rope_scaling, tied):
    hf = tiny_hf_checkpoint(tmp_path, rope_scaling, tied)
    source = resolve_model_source(EngineConfig(model=str(tmp_path)))
    assert source.kind == "hf" and source.arch.tie_word_embeddings == tied
    assert (source.arch.rope_scaling is None) == (rope_scaling is None)
    assert source.eos_token_ids == (2, 7)
    ours = load_model(source, torch.float32, torch.device("cpu"), progress=False)
    driver = PagedDriver(ours, num_blocks=32, block_size=16)
    prompt = list(range(3, 200, 3))  # 66 tokens: positions past original_max_position_embeddings
    logits = driver.step([("p", prompt[:40])])
    logits = torch.cat([logits, driver.step([("p", prompt[40:])])])
    ref = hf_last_logits(hf, prompt)
    torch.testing.assert_close(logits, ref[[39, len(prompt) - 1]], atol=1e-4, rtol=1e-4)


def test_dummy_load_is_deterministic_and_finite():
    source = resolve_model_source(EngineConfig(model="configs/llama-3-8b-instruct", load_format="dummy"))
    assert source.kind == "dummy" and source.arch.num_hidden_layers == 32
    assert source.eos_token_ids == (128001, 128009)
    small = ArchConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    from dataclasses import replace
    tiny = replace(source, arch=small)
    models = [load_model(tiny, torch.float32, torch.device("cpu"), progress=False) for _ in range(2)]
    logits = [PagedDriver(m, num_blocks=8, block_size=4).step([("x", [5, 6, 7, 8, 9])]) for m in models]
    assert torch.isfinite(logits[0]).all()
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
