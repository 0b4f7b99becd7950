"""GGUF 4-bit blocks (Q4_0, Q4_1, Q4_K) in torch's int4 CPU layout (kernels/cpu_int4.py): the groups of 32
give the file's weights, the packed matmul multiplies them, a bf16 CPU layer of `--quantization gguf`
holds them so for few rows and as bf16 weights for more (float32 layers keep the exact reference), the
AOTInductor package serves both sides of that choice, and the embedded model served so stays as close
to its float32 logits as the dense bf16 model."""

from __future__ import annotations

import sys

import pytest
import torch

from fitserve.config import EngineConfig
from fitserve.kernels import cpu_int4, gguf
from fitserve.layers.formats.gguf import INT4_MAX_ROWS, GgufLinear
from fitserve.layers.formats.registry import make_linear
from fitserve.models.loader import load_model
from fitserve.runner import cpu_aot
from fitserve.runner.cpu_compile import lower_int4_mm_as_fallback
from fitserve.weights.source import resolve_model_source
from paged_helpers import PagedDriver
from test_gguf_quant import PROMPTS, TYPE_IDS, packed, random_packed, reference

CPU = torch.device("cpu")
INT4_NAMES = ["Q4_0", "Q4_1", "Q4_K"]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("name", INT4_NAMES)
def test_the_groups_of_32_give_the_files_weights(name):
    blocks = random_packed(name, 6, 512, seed=1)
    block = gguf.BLOCK_TYPES[TYPE_IDS[name]]
    q, scale, offset = gguf.nibbles_and_affine(blocks.view(-1, block.block_bytes), TYPE_IDS[name])
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert scale.shape == offset.shape == (q.shape[0], q.shape[1] // 32)
    weights = (q.float().view(q.shape[0], -1, 32) * scale[..., None] + offset[..., None]).reshape(6, 512)
    torch.testing.assert_close(weights, reference(blocks, name), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", INT4_NAMES)
@pytest.mark.parametrize("num_rows", [1, 3, 16])
def test_the_packed_int4_matmul_multiplies_the_files_weights(name, num_rows):
    assert cpu_int4.takes(TYPE_IDS[name], 48, torch.bfloat16, CPU)
    blocks = random_packed(name, 48, 768, seed=2)
    weight, scales_and_zeros = cpu_int4.int4_form(blocks, TYPE_IDS[name])
    assert weight.shape == (48, 384) and scales_and_zeros.shape == (24, 48, 2)
    x = torch.randn(num_rows, 768, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    got = cpu_int4.matmul(x, weight, scales_and_zeros)
    assert got.dtype == torch.bfloat16 and got.shape == (num_rows, 48)
    # bf16 inputs, bf16 scales and zeros (2^-9 relative), bf16 output
    assert relative_error(got, x.float() @ reference(blocks, name).T) < 1e-2


def test_only_bf16_layers_on_the_cpu_hold_the_int4_form():
    assert cpu_int4.takes(TYPE_IDS["Q4_1"], 64, torch.bfloat16, CPU)
    assert not cpu_int4.takes(TYPE_IDS["Q4_1"], 64, torch.float32, CPU)
    assert not cpu_int4.takes(TYPE_IDS["Q4_1"], 64, torch.bfloat16, torch.device("cuda"))
    assert not cpu_int4.takes(TYPE_IDS["Q8_0"], 64, torch.bfloat16, CPU)
    assert not cpu_int4.takes(TYPE_IDS["Q4_1"], 40, torch.bfloat16, CPU)  # rows in sixteens only
    shards = [packed("Q4_1", 64, 256, 5), packed("Q6_K", 32, 256, 6), packed("Q4_0", 8, 256, 7)]
    dense = torch.cat([reference(s.data, s.type_name) for s in shards])
    for dtype, int4, names in (
            # bf16: no file bytes; the Q6_K part and the Q4_0 part of 8 rows (not sixteens) are dense
            (torch.bfloat16, [True, False, False], ["int4_0", "int4_scales_0", "weight_0", "weight_1", "weight_2"]),
            (torch.float32, [False, False, False], ["packed_0", "packed_1", "packed_2"])):
        layer = int4_layer(shards, dtype)
        assert [part.int4 for part in layer.parts] == int4 and sorted(layer.state_dict()) == names
        x = torch.randn(2, 256, generator=torch.Generator().manual_seed(7)).to(dtype)
        assert relative_error(layer(x), x.float() @ dense.T) < (1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert torch.equal(layer.dequantized().weight, dense)  # float32: the file's weights exactly


def int4_layer(shards, dtype=torch.bfloat16) -> GgufLinear:
    layer = make_linear(256, tuple(s.shape[0] for s in shards), dtype, CPU, "gguf")
    assert isinstance(layer, GgufLinear)
    for index, shard in enumerate(shards):
        layer.load(index, "weight", shard)
    layer.finish_loading()
    return layer


def test_few_rows_take_the_int4_matmul_and_more_the_bf16_weights():
    shard = packed("Q4_K", 64, 256, 9)
    layer = int4_layer([shard])
    bf16_weights = gguf.dequantize(shard.data, TYPE_IDS["Q4_K"], torch.bfloat16)
    assert torch.equal(layer.weight_0, bf16_weights) and torch.equal(layer.dequantized().weight, bf16_weights)
    x = torch.randn(INT4_MAX_ROWS + 1, 256, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    for rows in (1, INT4_MAX_ROWS):
        assert torch.equal(layer(x[:rows]), cpu_int4.matmul(x[:rows], layer.int4_0, layer.int4_scales_0))
    assert torch.equal(layer(x), torch.nn.functional.linear(x, bf16_weights))


@pytest.mark.skipif(cpu_aot.cpp_compiler() is None, reason="AOTInductor needs a C++ compiler")
def test_a_package_serves_both_sides_of_the_rows_choice_with_the_models_own_tensors(tmp_path, monkeypatch):
    """Exported with symbolic rows the choice is a torch.cond; inductor's own lowering of the int4 matmul
    would add a group-size constant that the model's tensors do not hold (load_constants then has nothing
    to give it): lowered as a fallback op (cpu_compile.lower_int4_mm_as_fallback) it needs only the layer's."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    layer = int4_layer([packed("Q4_1", 48, 256, 11), packed("Q8_0", 16, 256, 12)])
    x = torch.randn(12, 256, generator=torch.Generator().manual_seed(13)).to(torch.bfloat16)
    exported = torch.export.export(layer, (x,), dynamic_shapes=({0: torch.export.Dim("rows", min=1, max=16)},))
    lower_int4_mm_as_fallback()
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "int4.pt2"),
                                                    inductor_configs={"aot_inductor.package_constants_in_so": False})
    package = torch._inductor.aoti_load_package(path)
    fqns = package.get_constant_fqns()
    assert sorted(fqns) == ["int4_0", "int4_scales_0", "weight_0", "weight_1"]
    package.load_constants({fqn: getattr(layer, fqn) for fqn in fqns}, check_full_update=True, user_managed=True)
    for rows in (1, INT4_MAX_ROWS, INT4_MAX_ROWS + 1, 12):
        torch.testing.assert_close(package(x[:rows]), layer(x[:rows]), rtol=0, atol=0)


@pytest.mark.skipif(cpu_aot.cpp_compiler() is None, reason="inductor's CPU code needs a C++ compiler")
def test_torch_compile_takes_the_int4_layer_on_both_sides(tmp_path, monkeypatch):
    """--cpu-compile decode compiles the step with torch.compile: inductor's own lowering of the int4 matmul
    fails there ("group size must be a scalar"); the fallback serves one row (specialized) and more."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    lower_int4_mm_as_fallback()
    layer = int4_layer([packed("Q4_K", 32, 256, 14)])
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    x = torch.randn(12, 256, generator=torch.Generator().manual_seed(15)).to(torch.bfloat16)
    for rows in (1, 3, 12):
        torch.testing.assert_close(compiled(x[:rows]), layer(x[:rows]), rtol=0, atol=0)


@pytest.mark.slow
def test_the_embedded_model_in_int4_is_as_close_to_float32_as_dense_bf16():
    """Its Q4_1 projections through the int4 matmul (bf16 scales and zeros) against the same file
    dequantized at load to bf16 (bf16 weights), both against the file's exact weights in float32."""
    source = resolve_model_source(EngineConfig())
    int4_model = load_model(source, torch.bfloat16, CPU, progress=False, quantization="gguf")
    assert all(part.int4 for part in int4_model.layers[0].mlp.down_proj.parts)
    dense_model = load_model(source, torch.bfloat16, CPU, progress=False)
    exact_model = load_model(source, torch.float32, CPU, progress=False)
    logits = {name: PagedDriver(model, num_blocks=32, block_size=4).step(list(PROMPTS.items())).float()
              for name, model in (("int4", int4_model), ("dense", dense_model), ("exact", exact_model))}
    int4_error = (logits["int4"] - logits["exact"]).abs()
    dense_error = (logits["dense"] - logits["exact"]).abs()
    print(f"int4 {int4_error.mean():.4f} / {int4_error.max():.3f}, bf16 {dense_error.mean():.4f} / "
          f"{dense_error.max():.3f} (mean / max logit error)", file=sys.stderr)
    assert int4_error.mean() <= 1.25 * dense_error.mean() and int4_error.max() <= 1.25 * dense_error.max()
    # the next tokens of the dense bf16 model (prompt "a"'s is not float32's for either of them)
    assert torch.equal(logits["int4"].argmax(-1), logits["dense"].argmax(-1))
