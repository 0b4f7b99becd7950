"""Tokenizer: GGUF conversion (cached), chat template, HF folder, dummy fallback."""

from __future__ import annotations

import pytest

from fitserve.config import EngineConfig
from fitserve.engine.errors import InvalidRequestError
from fitserve.engine import tokenizer as tokenizer_module
from fitserve.engine.tokenizer import Tokenizer
from fitserve.weights.source import resolve_model_source

TEXTS = ["Hello world 12345", "  leading spaces and\ttabs\n\nnewlines", "héllo ünïcode 日本語 😀",
         "<|im_start|>user\nhi<|im_end|>", "don't stop-believin' 3.14159 x**2", ""]


@pytest.fixture(scope="module")
def gguf_source():
    return resolve_model_source(EngineConfig())


@pytest.fixture(scope="module")
def smol_tokenizer(gguf_source, tmp_path_factory):
    cache = tmp_path_factory.mktemp("tokcache")
    first = Tokenizer.from_source(gguf_source, cache_dir=cache)  # converts and saves
    with pytest.MonkeyPatch.context() as patch:  # the second load must come from the cache, not convert again
        patch.setattr(tokenizer_module, "gguf_tokenizer", lambda path: pytest.fail("converted a cached tokenizer"))
        cached = Tokenizer.from_source(gguf_source, cache_dir=cache)
    assert all(first.encode(t) == cached.encode(t) for t in TEXTS)
    return cached


@pytest.mark.slow
def test_gguf_round_trip_and_ids(smol_tokenizer):
    tok = smol_tokenizer
    assert tok.encode("Hello world 12345") == [19556, 905, 216, 33, 34, 35, 36, 37]
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>") == [1]
    assert tok.eos_token_ids == (2,) and tok.eos_token_id == 2 and tok.bos_token_id == 1
    assert tok.vocab_size == 49152 and {0, 1, 2} <= set(tok.all_special_ids)
    assert tok.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    assert tok.hf.backend_tokenizer is not None  # for tokenizers.decoders.DecodeStream


@pytest.mark.slow
def test_gguf_conversion_matches_transformers(gguf_source, smol_tokenizer):
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast
    path = Path(gguf_source.tokenizer_path)
    ref = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        assert smol_tokenizer.encode(text) == ref.encode(text), text


@pytest.mark.slow
def test_chat_template_is_chatml(smol_tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = smol_tokenizer.apply_chat_template(messages)
    text = smol_tokenizer.decode(ids, skip_special_tokens=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert ids[0] == 1 and ids.count(1) == 3  # no extra BOS
    no_prompt = smol_tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert smol_tokenizer.decode(no_prompt, skip_special_tokens=False).endswith("<|im_end|>\n")


@pytest.mark.slow
def test_continue_final_message_ends_inside_the_final_message(smol_tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red, and"}]
    ids = smol_tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    text = smol_tokenizer.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nRed, and")
    with pytest.raises(InvalidRequestError) as info:  # a request's own template: refused, not ignored
        smol_tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                           request_template="{{ messages[0].content }}")
    assert info.value.param == "continue_final_message"


@pytest.mark.slow
def test_chat_template_failure_is_invalid_request(smol_tokenizer):
    with pytest.raises(InvalidRequestError) as info:
        smol_tokenizer.apply_chat_template([{"role": "user"}])  # no content
    assert info.value.param == "messages"


def test_hf_folder_tokenizer(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    raw = RawTokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}')
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "vocab_size": 5, "hidden_size": 8, '
                                          '"intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, '
                                          '"eos_token_id": 2}')
    source = resolve_model_source(EngineConfig(model=str(tmp_path), load_format="dummy"))
    assert source.tokenizer_kind == "hf" and source.eos_token_ids == (2,)
    tok = Tokenizer.from_source(source)
    assert tok.encode("hello world", add_special_tokens=False) == [3, 4]
    assert tok.eos_token_ids == (2,)
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])  # this folder has no template


def test_dummy_fallback_tokenizer():
    source = resolve_model_source(EngineConfig(model="configs/llama-3-8b-instruct", load_format="dummy"))
    assert source.tokenizer_kind == "none"
    tok = Tokenizer.from_source(source)
    assert tok.vocab_size == 128256 and tok.eos_token_ids == (128001, 128009)
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.decode(tok.encode("héllo 日本")) == "héllo 日本"
    ids = tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert tok.decode(ids).endswith("<|assistant|>\n")
    assert tok.decode([5, 128001], skip_special_tokens=True) == tok.decode([5])


@pytest.mark.slow
def test_token_bytes_rebuild_characters_split_across_tokens(smol_tokenizer):
    tok = smol_tokenizer
    text = "héllo ϔ 日本 😀"
    ids = tok.encode(text)
    pieces = [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the text must split a character across tokens"
    assert bytes(b for i in ids for b in tok.token_bytes(i)).decode() == text


def test_chat_template_flag_replaces_the_models_template(tmp_path):
    """--chat-template reaches the tokenizer through the model source, in place of the tiny dummy
    model's fallback template."""
    from tiny_model import write_tiny_model

    folder = write_tiny_model(tmp_path / "tiny")
    messages = [{"role": "user", "content": "hi"}]
    plain = Tokenizer.from_source(resolve_model_source(EngineConfig(model=str(folder), load_format="dummy")))
    assert plain.render_chat(messages) != "<user>hi>"
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}>{% endif %}")
    config = EngineConfig(model=str(folder), load_format="dummy", chat_template=template)
    templated = Tokenizer.from_source(resolve_model_source(config))
    assert templated.render_chat(messages) == "<user>hi>"
