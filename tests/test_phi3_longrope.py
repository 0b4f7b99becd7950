"""Phi-3's LongRoPE rope scaling (longrope.py) matches transformers on a tiny random checkpoint
(original_max_position_embeddings 32, max_position_embeddings 128, factors drawn between 1 and 4),
float32 on the CPU: with a served context of 32 tokens (the short factors) on a 20-token prompt, and
of 128 (the long factors) on prompts longer than 32, through the paged cache and through the whole
engine; a GGUF file holding the factor tensors gives the logits of the safetensors checkpoint; a
malformed factor list is refused before any weight is read."""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf_writer import add_common_header, gguf_tensors, write_gguf
from hf_compare_helpers import check_prefill_and_decode, save_random_checkpoint
from paged_helpers import PagedDriver

from fitserve.arch_config import ArchConfig
from fitserve.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from fitserve.layers.rotary import RotaryEmbedding
from fitserve.llm import build_engine
from fitserve.longrope import LongRopeScaling
from fitserve.models.loader import load_model
from fitserve.sampling_params import SamplingParams
from fitserve.weights.source import ModelSource, resolve_model_source

ORIGINAL_TOKENS, MAX_TOKENS, HEAD_DIM = 32, 128, 16
CPU = torch.device("cpu")


def _factors(seed: int) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(1.0, 4.0), 4) for _ in range(HEAD_DIM // 2)]


SHORT, LONG = _factors(1), _factors(2)
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=MAX_TOKENS, original_max_position_embeddings=ORIGINAL_TOKENS,
            bos_token_id=1, eos_token_id=95, pad_token_id=0, tie_word_embeddings=False,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT,
                             "long_factor": LONG})
PROMPT_20 = [(7 * j + 3) % 96 for j in range(20)]
PROMPT_48 = [(5 * j + 11) % 96 for j in range(48)]
PROMPT_40 = [(3 * j + 2) % 96 for j in range(40)]


def write_checkpoint(folder) -> transformers.Phi3ForCausalLM:
    torch.manual_seed(0)
    return save_random_checkpoint(folder, transformers.Phi3ForCausalLM(transformers.Phi3Config(**TINY)).eval())


def served(source: ModelSource, max_model_len: int) -> ModelSource:
    """The source as start-up serves it at --max-model-len (startup.served_source)."""
    return replace(source, arch=source.arch.served_at(max_model_len))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3-longrope")
    return folder, write_checkpoint(folder)


def test_the_config_is_read_as_transformers_reads_it(checkpoint):
    folder, hf = checkpoint
    scaling = resolve_model_source(EngineConfig(model=str(folder))).arch.rope_scaling
    assert isinstance(scaling, LongRopeScaling)
    assert (scaling.short_factor, scaling.long_factor) == (tuple(SHORT), tuple(LONG))
    assert scaling.original_max_position_embeddings == ORIGINAL_TOKENS
    assert scaling.attention_factor == pytest.approx(hf.model.rotary_emb.attention_scaling, rel=1e-12)
    assert scaling.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(32)))
    assert scaling.uses_long_factors and not scaling.served_at(ORIGINAL_TOKENS).uses_long_factors


@pytest.mark.parametrize("max_model_len, num_positions", [(ORIGINAL_TOKENS, 20), (MAX_TOKENS, 48)])
def test_the_cos_sin_table_is_transformers(checkpoint, max_model_len, num_positions):
    """The table's rows equal transformers' cos/sin (attention factor included) for a sequence of
    `num_positions` tokens, which picks the same list in transformers."""
    folder, hf = checkpoint
    arch = resolve_model_source(EngineConfig(model=str(folder))).arch.served_at(max_model_len)
    ours = RotaryEmbedding(HEAD_DIM, arch.rope_theta, max_model_len, arch.rope_scaling, CPU)
    positions = torch.arange(num_positions)[None]
    cos, sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(ours.cos[:num_positions], cos[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.sin[:num_positions], sin[0], rtol=1e-6, atol=1e-6)


def test_a_short_served_context_matches_transformers_with_the_short_factors(checkpoint):
    folder, hf = checkpoint
    source = served(resolve_model_source(EngineConfig(model=str(folder))), ORIGINAL_TOKENS)
    ours = load_model(source, torch.float32, CPU, progress=False)
    check_prefill_and_decode(ours, hf, prompts=[PROMPT_20, PROMPT_20[:7]], num_decode_steps=4)  # 24 tokens at most


def test_a_long_served_context_matches_transformers_above_the_original_context(checkpoint):
    folder, hf = checkpoint
    source = served(resolve_model_source(EngineConfig(model=str(folder))), MAX_TOKENS)
    ours = load_model(source, torch.float32, CPU, progress=False)
    check_prefill_and_decode(ours, hf, prompts=[PROMPT_48, PROMPT_40], num_decode_steps=4)


def test_the_served_context_decides_the_list(checkpoint):
    """A 20-token prompt is rotated with the short factors at --max-model-len 32 and with the long
    ones at 128 (the choice is per server): the logits differ, and only the first is transformers'."""
    folder, hf = checkpoint
    source = resolve_model_source(EngineConfig(model=str(folder)))
    logits = [PagedDriver(load_model(served(source, n), torch.float32, CPU, progress=False)).step([("a", PROMPT_20)])[0]
              for n in (ORIGINAL_TOKENS, MAX_TOKENS)]
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT_20])).logits[0, -1]
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)
    assert (logits[1] - expected).abs().max() > 1e-3


def _engine_tokens(folder, max_model_len: int, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    config = EngineConfig(model=str(folder), dtype="float32", device="cpu",
                          cache=CacheConfig(num_gpu_blocks_override=64, block_size=8),
                          scheduler=SchedulerConfig(max_model_len=max_model_len, max_num_seqs=4))
    engine = build_engine(config, progress=False).engine
    for i, prompt in enumerate(prompts):
        engine.add_request(engine.make_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0)))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [tokens[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("max_model_len, prompts, max_tokens, which", [
    (MAX_TOKENS, [PROMPT_48, PROMPT_40], 20, "long"),
    (ORIGINAL_TOKENS, [PROMPT_20[:12]], 16, "short"),  # 28 tokens, inside the original context
])
def test_the_engine_generates_transformers_greedy_tokens(checkpoint, caplog, max_model_len, prompts, max_tokens,
                                                          which):
    folder, hf = checkpoint
    with caplog.at_level(logging.INFO, logger="fitserve.startup"):
        got = _engine_tokens(folder, max_model_len, prompts, max_tokens)
    assert f"LongRoPE: the {which} factors, for a served context of {max_model_len} tokens" in caplog.text
    for prompt, tokens in zip(prompts, got):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                              eos_token_id=hf.config.eos_token_id, pad_token_id=0)
        assert tokens == ref[0, ids.shape[1]:].tolist()


def _rewrite_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("bad, match", [
    (dict(short_factor=SHORT[:-1]), "short_factor has 7 entries, but the model rotates 16 dimensions"),
    (dict(long_factor=LONG + [1.0]), "long_factor has 9 entries"),
    (dict(long_factor="1.0"), "needs long_factor, a list of numbers"),
    (dict(short_factor=[0.0] * 8), "short_factor must be a non-empty list of positive numbers"),
])
def test_a_malformed_factor_list_is_refused_before_any_weight_is_read(tmp_path, bad, match):
    write_checkpoint(tmp_path)
    params = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    _rewrite_config(tmp_path, rope_parameters={**params, **bad})
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()  # nothing to read: the error comes from config.json alone
    with pytest.raises(ConfigError, match=match):
        resolve_model_source(EngineConfig(model=str(tmp_path)))


HF4_CONFIG = dict(architectures=["Phi3ForCausalLM"], vocab_size=96, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=131072)


@pytest.mark.parametrize("rope_scaling, top_level, original, attention", [
    # Phi-3-mini-128k's first config.json: "su", the original context at the top level
    ({"type": "su", "short_factor": SHORT, "long_factor": LONG}, {"original_max_position_embeddings": 4096},
     4096, math.sqrt(1 + math.log(32) / math.log(4096))),
    # transformers reads Phi-3's top-level key over rope_scaling's (Phi3Config's default, 4096, when absent)
    ({"type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 8192},
     {}, 4096, math.sqrt(1 + math.log(32) / math.log(4096))),
    # an explicit attention_factor, or factor, wins over the default
    ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "attention_factor": 1.5},
     {"original_max_position_embeddings": 4096}, 4096, 1.5),
    ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "factor": 8.0},
     {"original_max_position_embeddings": 4096}, 4096, math.sqrt(1 + math.log(8) / math.log(4096))),
])
def test_config_json_layouts(rope_scaling, top_level, original, attention):
    arch = ArchConfig.from_hf_config({**HF4_CONFIG, "rope_scaling": rope_scaling, **top_level})
    assert isinstance(arch.rope_scaling, LongRopeScaling)
    assert arch.rope_scaling.original_max_position_embeddings == original
    assert arch.rope_scaling.attention_factor == pytest.approx(attention, rel=1e-12)
    assert arch.rope_scaling.long_factor == tuple(LONG) and arch.rope_scaling.served_context_tokens == 131072
    assert arch.served_at(4096).rope_scaling.ext_factors == tuple(SHORT)
    assert arch.served_at(4097).rope_scaling.ext_factors == tuple(LONG)


def test_longrope_is_refused_for_other_architectures():
    rope_scaling = {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG}
    with pytest.raises(ConfigError, match="'longrope' is served for Phi3ForCausalLM only, not LlamaForCausalLM"):
        ArchConfig.from_hf_config({**HF4_CONFIG, "architectures": ["LlamaForCausalLM"], "rope_scaling": rope_scaling})


# -- GGUF --------------------------------------------------------------------------------------------------------


def write_gguf_file(path, hf, attn_factor: float | None, factor_tensors: tuple[str, ...] = ("long", "short")) -> None:
    """As llama.cpp's converter writes a LongRoPE Phi-3: the factor lists as float32 tensors and the
    original context and attention factor in the metadata."""
    cfg = hf.config

    def header(writer: gguf.GGUFWriter) -> None:
        add_common_header(writer, cfg)
        writer.add_rope_dimension_count(HEAD_DIM)
        writer.add_rope_scaling_orig_ctx_len(ORIGINAL_TOKENS)
        if attn_factor is not None:
            writer.add_rope_scaling_attn_factors(attn_factor)

    factors = {"long": np.array(LONG, np.float32), "short": np.array(SHORT, np.float32)}
    tensors = {**gguf_tensors(hf, gguf.MODEL_ARCH.PHI3),
               **{f"rope_factors_{name}.weight": factors[name] for name in factor_tensors}}
    write_gguf(path, "phi3", tensors, header, tokenizer="llama")


@pytest.mark.parametrize("max_model_len", [ORIGINAL_TOKENS, MAX_TOKENS])
@pytest.mark.parametrize("attn_factor", [math.sqrt(1 + math.log(4) / math.log(32)), None])  # None: key absent
def test_a_gguf_file_gives_the_logits_of_the_safetensors_checkpoint(checkpoint, tmp_path, max_model_len, attn_factor):
    folder, hf = checkpoint
    path = tmp_path / "tiny-phi3-longrope.gguf"
    write_gguf_file(path, hf, attn_factor)
    from_gguf = resolve_model_source(EngineConfig(model=str(path)))
    from_folder = resolve_model_source(EngineConfig(model=str(folder)))
    ours, theirs = from_gguf.arch.rope_scaling, from_folder.arch.rope_scaling
    assert isinstance(ours, LongRopeScaling) and (ours.short_factor, ours.long_factor) == (
        theirs.short_factor, theirs.long_factor)  # read back as config.json spells them
    assert (ours.original_max_position_embeddings, ours.served_context_tokens) == (ORIGINAL_TOKENS, MAX_TOKENS)
    assert ours.attention_factor == pytest.approx(theirs.attention_factor, rel=1e-6)
    prompt = PROMPT_20 if max_model_len == ORIGINAL_TOKENS else PROMPT_48
    logits = [PagedDriver(load_model(served(source, max_model_len), torch.float32, CPU, progress=False)).step(
        [("a", prompt), ("b", prompt[:9])]) for source in (from_gguf, from_folder)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_a_gguf_file_with_one_factor_list_is_refused(checkpoint, tmp_path):
    path = tmp_path / "tiny-phi3-one-list.gguf"
    write_gguf_file(path, checkpoint[1], 1.0, factor_tensors=("long",))
    with pytest.raises(ConfigError, match="holds rope_factors_long.weight but not rope_factors_short.weight"):
        resolve_model_source(EngineConfig(model=str(path)))
