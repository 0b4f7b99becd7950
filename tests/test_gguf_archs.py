"""What every GGUF reader shares: the architecture dispatch (an architecture fitserve does not read is
refused from the header, naming it and the ones it reads) and the tokenizer of a SentencePiece file
(`tokenizer.ggml.model == llama`: Mistral, Mixtral, Phi-3), built by transformers' GGUF converter."""

from __future__ import annotations

import gguf
import pytest

from fitserve.config import ConfigError, EngineConfig
from fitserve.engine.tokenizer import gguf_tokenizer
from fitserve.weights.gguf_file import GGUF_ARCHITECTURES
from fitserve.weights.source import resolve_model_source

# SentencePiece pieces: '▁' marks a word start; merges are recovered from the scores
PIECES = ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab", "▁ab", "<|end|>"]
TYPES = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
    [gguf.TokenType.NORMAL] * 6 + [gguf.TokenType.CONTROL]
SCORES = [0.0, 0.0, 0.0, -5.0, -4.0, -4.0, -2.0, -3.0, -1.0, 0.0]


def write_header_only(path, arch: str) -> None:
    """A file with metadata and no tensors: enough for the source's ArchConfig and the tokenizer."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(PIECES)
    writer.add_token_types(TYPES)
    writer.add_token_scores(SCORES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["qwen2moe", "falcon", "gemma4"])
def test_an_architecture_fitserve_does_not_read_is_refused_naming_it(tmp_path, arch):
    path = tmp_path / f"tiny-{arch}.gguf"
    write_header_only(path, arch)
    with pytest.raises(ConfigError) as info:
        resolve_model_source(EngineConfig(model=str(path)))
    message = str(info.value)
    assert f"GGUF architecture {arch!r} is not supported" in message
    assert all(repr(name) in message for name in GGUF_ARCHITECTURES)


def test_a_file_lacking_a_required_key_names_it(tmp_path):
    path = tmp_path / "tiny-phi3-lacking.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="lacks phi3.attention.head_count"):
        resolve_model_source(EngineConfig(model=str(path)))


@pytest.mark.parametrize(("arch", "ids"), [
    ("llama", [1, 8, 8]),  # <s>, then '▁ab' twice: a word start on each word
    ("phi3", [1, 8, 8]),
    ("gemma2", [1, 7, 8]),  # Gemma's tokenizer adds no word start before the first word
])
def test_a_sentencepiece_file_gets_transformers_converted_tokenizer(tmp_path, arch, ids):
    path = tmp_path / f"tiny-{arch}-sp.gguf"
    write_header_only(path, arch)
    tokenizer = gguf_tokenizer(str(path))
    assert tokenizer.encode("ab ab") == ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab ab"
    assert tokenizer.encode("<|end|>", add_special_tokens=False) == [9]  # a control token stays whole
    assert tokenizer.eos_token == "</s>"
    # Phi-3 ends a chat turn with <|end|>: an eos besides the file's own
    expected_eos = (2, 9) if arch == "phi3" else (2,)
    assert resolve_model_source(EngineConfig(model=str(path))).eos_token_ids == expected_eos


@pytest.mark.parametrize(("pre", "expected"), [
    ("tekken", ["1", "2", "3", "4", "5"]),  # Mistral's regex: every digit alone, so no merge applies
    ("llama-bpe", ["12", "3", "4", "5"]),  # Llama 3's: digits in runs of up to 3 ("123" "45"): no "34"
    ("smollm", ["12", "34", "5"]),  # not a regex transformers knows: GPT-2's (one run of digits) as before
])
def test_a_byte_level_file_splits_as_its_pre_tokenizer_says(tmp_path, pre, expected):
    """`tokenizer.ggml.pre` names the regex the merges were learned under; with merges "1 2" and "3 4",
    "12345" shows which one split the text."""
    path = tmp_path / f"tiny-{pre}.gguf"
    vocab = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["12", "34"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(vocab))
    writer.add_token_merges(["1 2", "3 4"])
    writer.add_eos_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokenizer = gguf_tokenizer(str(path))
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("12345", add_special_tokens=False)) == expected


def test_expert_tensor_names_stacked_and_per_expert():
    import numpy as np

    from fitserve.weights.gguf_moe import mixtral_hf_tensor_name, per_expert, qwen3moe_hf_tensor_name
    stacked = mixtral_hf_tensor_name("blk.2.ffn_down_exps.weight")
    values = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)  # 3 experts
    split = list(per_expert(stacked, values))
    assert [name for name, _ in split] == [f"model.layers.2.block_sparse_moe.experts.{e}.w2.weight" for e in range(3)]
    assert all(np.array_equal(part, values[e]) for e, (_, part) in enumerate(split))
    assert mixtral_hf_tensor_name("blk.1.ffn_gate.5.weight") == "model.layers.1.block_sparse_moe.experts.5.w1.weight"
    assert mixtral_hf_tensor_name("blk.1.ffn_gate_inp.weight") == "model.layers.1.block_sparse_moe.gate.weight"
    assert mixtral_hf_tensor_name("blk.1.attn_q.weight") == "model.layers.1.self_attn.q_proj.weight"
    assert qwen3moe_hf_tensor_name("blk.0.ffn_up_exps.weight") == "model.layers.0.mlp.experts.{expert}.up_proj.weight"
    assert qwen3moe_hf_tensor_name("blk.0.attn_k_norm.weight") == "model.layers.0.self_attn.k_norm.weight"
    assert list(per_expert("model.norm.weight", values)) == [("model.norm.weight", values)]
