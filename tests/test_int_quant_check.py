"""`fitserve check-quant` on a packed checkpoint: its kernels against the format's own dequantized
weights (always), and against a bf16 original when one is given (`--reference-model`)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from test_int_quant import quantized_checkpoint

from fitserve.config import EngineConfig
from fitserve.kernels import int_quant
from fitserve.layers.formats.gguf import GgufLinear
from fitserve.quantcheck.check import dequantize_packed_layers, run_check
from fitserve.quantcheck.prompts import PROMPTS
from fitserve.weights.dummy_gguf import random_blocks
from fitserve.weights.dummy_quant import GGML_TYPE_IDS
from fitserve.weights.gguf_packed import PackedGgufTensor

TWO_PROMPTS = PROMPTS[:2]


def write_byte_tokenizer(folder) -> None:
    """A byte-level tokenizer of 256 tokens (the tiny checkpoints' vocabulary is 320), eos id 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw = Tokenizer(models.BPE({symbol: i for i, symbol in enumerate(sorted(alphabet))}, []))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))


def gptq_folder(path):
    path.mkdir()
    quantized_checkpoint(path, "gptq", act_order=True)
    write_byte_tokenizer(path)
    return path


def test_an_integer_checkpoint_is_checked_against_its_own_dequantized_weights(tmp_path):
    folder = gptq_folder(tmp_path / "gptq")
    report = run_check(EngineConfig(model=str(folder), dtype="float32", device="cpu"), max_new_tokens=4,
                       prompts=TWO_PROMPTS)
    assert report.reference == "weights gptq dequantized to float32, KV cache float32"
    assert report.quantized == "weights gptq, KV cache float32" and report.kernel_check is None
    # on the CPU the layer is the specification itself: the same weights, float32 sums
    assert report.top1_agreement == 1.0 and report.mean_kl < 1e-6


def test_the_check_sees_a_kernel_that_disagrees_with_the_dequantized_weights(tmp_path, monkeypatch):
    folder = gptq_folder(tmp_path / "gptq")
    exact = int_quant.int_quant_mm_reference

    def off_by_a_scale(x, qweight, scales, zeros, g_idx, bits):  # a kernel with a wrong scale
        return exact(x, qweight, scales * 1.5, zeros, g_idx, bits)

    monkeypatch.setattr(int_quant, "int_quant_mm_reference", off_by_a_scale)
    report = run_check(EngineConfig(model=str(folder), dtype="float32", device="cpu"), max_new_tokens=4,
                       prompts=TWO_PROMPTS)
    assert report.mean_kl > 1e-3


def test_with_an_original_both_comparisons_are_reported(tmp_path):
    folder = gptq_folder(tmp_path / "gptq")
    original = tmp_path / "original"  # the transformers model quantized_checkpoint started from (same seed)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(original)
    report = run_check(EngineConfig(model=str(folder), dtype="float32", device="cpu"), max_new_tokens=4,
                       prompts=TWO_PROMPTS, reference_model=str(original))
    assert report.reference == f"weights float32, KV cache float32 ({original})"
    assert report.kernel_check is not None and report.kernel_check.top1_agreement == 1.0
    assert report.kernel_check.setting == "weights gptq dequantized to float32, KV cache float32"
    assert report.mean_kl > report.kernel_check.mean_kl  # 4-bit rounding shows against the original
    assert "against its own dequantized weights" in report.summary()
    assert json.loads(json.dumps(report.to_json()))["kernel_check"]["top1_agreement"] == 1.0


def test_check_quant_takes_an_integer_checkpoint_without_flags(tmp_path, capsys):
    from fitserve.cli import main

    folder = gptq_folder(tmp_path / "gptq")
    assert main(["check-quant", "--model", str(folder), "--dtype", "float32", "--device", "cpu", "--num-prompts", "1",
                 "--max-new-tokens", "2", "--json", "--min-agreement", "0.99"]) == 0
    assert json.loads(capsys.readouterr().out)["reference"].startswith("weights gptq dequantized")


def test_a_gguf_layer_dequantized_multiplies_as_the_packed_one():
    layer = GgufLinear(512, (96, 32), torch.float32, torch.device("cpu"))
    for shard, (rows, type_name) in enumerate(((96, "Q4_K"), (32, "Q6_K"))):
        data = random_blocks(type_name, (rows, 512), torch.Generator().manual_seed(shard), torch.device("cpu"))
        layer.load(shard, "weight", PackedGgufTensor(data, GGML_TYPE_IDS[type_name], type_name, (rows, 512)))
    layer.finish_loading()
    model = torch.nn.Sequential(layer)
    x = torch.randn(5, 512)
    packed_out = model(x)
    assert dequantize_packed_layers(model) == 1 and not isinstance(model[0], GgufLinear)
    assert torch.equal(model(x), packed_out)


@pytest.mark.parametrize("bits", [4, 8])
def test_an_integer_layer_dequantized_holds_the_specifications_weights(bits):
    from fitserve.layers.formats.int_quant import IntQuantFormat
    from fitserve.weights.int_checkpoint import IntQuantScheme

    layer = IntQuantFormat(IntQuantScheme("gptq", bits, 32, False, False)).create(64, (16,), torch.float32,
                                                                                   torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, generator=gen, dtype=torch.uint8))
    layer.scales.copy_(torch.rand(layer.scales.shape, generator=gen))
    dense = layer.dequantized()
    assert torch.equal(dense.weight, int_quant.dequantize(layer.qweight, layer.scales, layer.zeros, None, bits,
                                                          torch.float32))
