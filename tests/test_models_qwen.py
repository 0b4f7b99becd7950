"""Qwen2/2.5 and Qwen3 match transformers on the same tiny random checkpoints (float32, CPU), and
the planner counts what the models allocate.

Each checkpoint is written by transformers' own model class (2 layers, GQA 4:2) with its biases
and norm weights drawn at random (transformers initialises biases to zero and norms to one, which
would hide a missing bias or q/k norm), then read back through fitserve's source and loader.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from fitserve.arch_config import ArchConfig
from fitserve.config import ConfigError, EngineConfig
from fitserve.layers.parallel import TensorParallel
from fitserve.models.qwen2 import Qwen2ForCausalLM
from fitserve.plan.shapes import counts_from_arch, model_param_counts, weight_bytes
from fitserve.weights.loader import safetensors_weights
from fitserve.weights.source import resolve_model_source
from hf_compare_helpers import check_engine_greedy, check_prefill_and_decode, load_ours, save_random_checkpoint

TINY = dict(vocab_size=311, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
QWEN3_HEAD_DIM = 32  # not hidden_size / heads (16): Qwen3 reads head_dim from the config


def qwen2_config(tied: bool) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(**TINY, tie_word_embeddings=tied)


def qwen3_config(tied: bool) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(**TINY, head_dim=QWEN3_HEAD_DIM, tie_word_embeddings=tied)


MODELS = {"qwen2": (qwen2_config, transformers.Qwen2ForCausalLM),
          "qwen3": (qwen3_config, transformers.Qwen3ForCausalLM)}


def write_checkpoint(folder, name: str, tied: bool):
    """transformers' model, its biases and norms random, saved as safetensors in `folder` (eval, float32)."""
    make_config, model_class = MODELS[name]
    torch.manual_seed(0)
    return save_random_checkpoint(folder, model_class(make_config(tied)).eval())


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_batched_prefill_and_decode_match_hf(tmp_path, name, tied):
    """Three prompts of different lengths prefilled in one batch, then decoded together through the
    paged cache; every step's logits equal transformers' on the whole sequence."""
    hf = write_checkpoint(tmp_path, name, tied)
    source, ours = load_ours(tmp_path)
    assert type(ours).__name__ == hf.config.architectures[0] and source.arch.tie_word_embeddings == tied
    check_prefill_and_decode(ours, hf)


def test_the_config_gives_qwen3_its_head_dim_and_norms_qwen2_its_biases(tmp_path):
    write_checkpoint(tmp_path / "q2", "qwen2", tied=False)
    write_checkpoint(tmp_path / "q3", "qwen3", tied=False)
    q2 = resolve_model_source(EngineConfig(model=str(tmp_path / "q2"))).arch
    q3 = resolve_model_source(EngineConfig(model=str(tmp_path / "q3"))).arch
    assert (q2.qkv_bias, q2.qk_norm, q2.head_dim) == (True, False, 16)
    assert (q3.qkv_bias, q3.qk_norm, q3.head_dim) == (False, True, QWEN3_HEAD_DIM)
    config = json.loads((tmp_path / "q3" / "config.json").read_text())
    del config["head_dim"]  # transformers' Qwen3Config then takes 128, whatever hidden_size / heads
    assert transformers.Qwen3Config(**config).head_dim == 128
    assert ArchConfig.from_hf_config(config).head_dim == 128


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_plan_weight_bytes_are_the_models_bytes(tmp_path, name, tied):
    """`fitserve plan`'s weight bytes, from config.json and from the safetensors headers, equal what
    the loaded model holds (parameters and the rotary tables)."""
    write_checkpoint(tmp_path, name, tied)
    source, ours = load_ours(tmp_path)
    held_bytes = sum(t.numel() * t.element_size() for t in [*ours.parameters(), *ours.buffers()])
    from_config = weight_bytes(counts_from_arch(source.arch), "float32", None)
    from_headers = weight_bytes(model_param_counts(source.arch, str(tmp_path)), "float32", None)
    assert from_config.total_bytes == from_headers.total_bytes == held_bytes
    biases = sum(p.numel() * 4 for n, p in ours.named_parameters() if n.endswith("qkv_bias"))
    assert from_config.bias_bytes == from_headers.bias_bytes == biases and (biases > 0) == (name == "qwen2")


def test_fp8_keeps_the_biases_in_the_serving_dtype():
    arch = ArchConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64, qkv_bias=True,
                      architecture="Qwen2ForCausalLM")
    model = Qwen2ForCausalLM(arch, torch.bfloat16, torch.device("cpu"), quantization="fp8_per_tensor")
    planned = weight_bytes(counts_from_arch(arch), "bfloat16", "fp8_per_tensor")
    biases = [p for n, p in model.named_parameters() if n.endswith("qkv_bias")]
    assert all(p.dtype == torch.bfloat16 for p in biases)
    assert planned.bias_bytes == sum(p.numel() * 2 for p in biases) == 2 * 2 * (64 + 2 * 32)


@pytest.mark.parametrize("whole", [True, False])  # handed whole, or read as the rank's slice
def test_a_tensor_parallel_rank_takes_its_rows_of_each_bias(tmp_path, whole):
    hf = write_checkpoint(tmp_path, "qwen2", tied=False)
    source = resolve_model_source(EngineConfig(model=str(tmp_path)))
    rank1 = Qwen2ForCausalLM(source.arch, torch.float32, torch.device("cpu"), tp=TensorParallel(rank=1, size=2))
    state = hf.state_dict()
    rank1.load_weights(state.items() if whole else safetensors_weights(str(tmp_path), rank1.checkpoint_slice))
    got = rank1.layers[1].self_attn.qkv_bias
    want = torch.cat([state[f"model.layers.1.self_attn.{p}_proj.bias"].chunk(2)[1] for p in "qkv"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert rank1.checkpoint_slice("model.layers.0.self_attn.k_proj.bias").length == 16  # 1 of 2 KV heads


@pytest.mark.parametrize("name,switch", [("qwen3", {"attention_bias": True})])
def test_switches_fitserve_does_not_implement_are_refused(tmp_path, name, switch):
    write_checkpoint(tmp_path, name, tied=False)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **switch}))
    with pytest.raises(ConfigError, match=next(iter(switch))):
        resolve_model_source(EngineConfig(model=str(tmp_path)))


def test_an_unknown_bias_tensor_is_refused(tmp_path):
    write_checkpoint(tmp_path, "qwen2", tied=False)
    source = resolve_model_source(EngineConfig(model=str(tmp_path)))
    model = Qwen2ForCausalLM(source.arch, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="o_proj.bias"):
        model.load_weights([("model.layers.0.self_attn.o_proj.bias", torch.zeros(64))])


# Qwen2.5-Instruct's ChatML template without its tool branch: a default system turn, <|im_start|>role
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def write_qwen_tokenizer(folder, template_file: bool) -> dict[str, int]:
    """A word-level tokenizer with Qwen's special tokens and eos (<|im_end|>), its chat template in
    tokenizer_config.json or (transformers 5's layout) chat_template.jinja; returns the special ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    words = ["hello", "world", "system", "user", "assistant", "You", "are", "Qwen"]
    raw = Tokenizer(models.WordLevel({"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens([AddedToken(t, special=True) for t in QWEN_SPECIAL_TOKENS])
    raw.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>", "bos_token": None}
    if template_file:
        (folder / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    else:
        config["chat_template"] = QWEN_CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return {t: raw.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}


@pytest.mark.parametrize("name,template_file", [("qwen2", False), ("qwen3", True)])
def test_the_tokenizer_and_chat_template_come_from_the_checkpoint_folder(tmp_path, name, template_file):
    from fitserve.engine.tokenizer import Tokenizer
    write_checkpoint(tmp_path, name, tied=True)
    ids = write_qwen_tokenizer(tmp_path, template_file)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids["<|im_end|>"], 2]}))
    source = resolve_model_source(EngineConfig(model=str(tmp_path)))
    assert source.tokenizer_kind == "hf" and source.tokenizer_path == str(tmp_path)
    assert source.eos_token_ids[1:] == (ids["<|im_end|>"],)  # config.json's 2, then generation_config's
    tok = Tokenizer.from_source(source)
    assert tok.render_chat([{"role": "user", "content": "hello world"}]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n")
    prompt = tok.apply_chat_template([{"role": "system", "content": "hello"}, {"role": "user", "content": "world"}])
    assert prompt[0] == ids["<|im_start|>"] and prompt.count(ids["<|im_end|>"]) == 2 and 0 not in prompt
    assert ids["<|im_end|>"] in tok.eos_token_ids


@pytest.mark.parametrize("name", list(MODELS))
def test_the_engine_generates_transformers_greedy_tokens(tmp_path, name):
    check_engine_greedy(tmp_path, write_checkpoint(tmp_path, name, tied=True))


def test_plan_counts_the_published_parameters_of_real_configs():
    """Qwen2.5-7B's config.json gives its published 7,615,616,512 parameters (q, k, v biases included);
    Qwen3-0.6B's its 0.44 B outside the (tied) embedding, q/k norms included."""
    qwen25_7b = ArchConfig.from_hf_config({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28})
    assert counts_from_arch(qwen25_7b).num_params == 7_615_616_512
    qwen3_06b = ArchConfig.from_hf_config({
        "architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "tie_word_embeddings": True})
    counts = counts_from_arch(qwen3_06b)
    assert counts.num_params - counts.embedding_params == 440_467_456
