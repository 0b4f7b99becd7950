"""The packed-GGUF Triton kernels (GEMV, small-batch GEMM, dequantize + cuBLAS) and the gguf layer on CUDA against the
torch reference (GPU only): every packed type, awkward sizes, both 16-bit dtypes, a CUDA graph,
prefill and decode batches."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from fitserve.kernels import gguf, triton_gguf  # noqa: E402  (triton comes with CUDA torch)
from fitserve.layers.formats.registry import make_linear  # noqa: E402
from fitserve.weights.gguf_packed import PackedGgufTensor  # noqa: E402

TYPES = {block.name: ggml_type for ggml_type, block in gguf.BLOCK_TYPES.items()}


def random_packed(name: str, num_rows: int, in_features: int, seed: int) -> torch.Tensor:
    """Random blocks on CUDA whose float16 scales are small and finite."""
    block = gguf.BLOCK_TYPES[TYPES[name]]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    packed = torch.randint(0, 256, (num_rows, block.row_bytes(in_features)), dtype=torch.uint8, device="cuda",
                           generator=gen)
    blocks = packed.view(-1, block.block_bytes)
    for offset in {"Q6_K": (208,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2)}.get(name, (0,)):
        scale = (torch.rand(blocks.shape[0], device="cuda", generator=gen) * 0.02 - 0.01).to(torch.float16)
        blocks[:, offset:offset + 2] = scale.view(torch.uint8).view(-1, 2)
    return packed


def in_features_for(name: str) -> int:
    """Not a multiple of the kernel's 256-wide tile for the 32-weight blocks: a partial last tile."""
    return 32 * 37 if gguf.BLOCK_TYPES[TYPES[name]].block_elements == 32 else 256 * 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 3, triton_gguf.GEMV_MAX_ROWS + 1, triton_gguf.DEQUANT_MIN_ROWS - 1,
                                        triton_gguf.DEQUANT_MIN_ROWS, 17, triton_gguf.GEMM_MAX_ROWS, 300])
@pytest.mark.parametrize("name", list(TYPES))
def test_decode_kernels_match_the_dequantized_product(name, num_tokens, dtype):
    """The GEMV (a few rows), the small tensor-core GEMM (more rows) and dequant_mm (from DEQUANT_MIN_ROWS),
    through triton_gguf.matmul."""
    k, n = in_features_for(name), 1000 + 3
    packed = random_packed(name, n, k, seed=n + num_tokens)
    x = torch.randn(num_tokens, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).to(dtype)
    got = triton_gguf.matmul(x, packed, TYPES[name])
    expected = x.float() @ gguf.dequantize(packed, TYPES[name]).T
    assert got.shape == (num_tokens, n) and got.dtype == dtype
    assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize("name", list(TYPES))
def test_dequant_mm_multiplies_the_weights_dequantized_at_load(name):
    """Its scratch holds the weights as loading the file without --quantization gguf does (float32, rounded
    once to bf16), within one bf16 rounding where the kernel's float32 arithmetic orders differently."""
    k = in_features_for(name)
    packed = random_packed(name, 70, k, seed=5)
    x = torch.randn(40, k, device="cuda").to(torch.bfloat16)
    got = triton_gguf.dequant_mm(x, packed, TYPES[name])
    weight = gguf.dequantize(packed, TYPES[name], torch.bfloat16)
    scratch = triton_gguf.dequant_scratch(70 * k, torch.bfloat16, x.device).view(70, k)
    torch.testing.assert_close(scratch, weight, rtol=2 ** -8, atol=0)
    torch.testing.assert_close(got, x @ weight.t(), rtol=2e-2, atol=2e-2)


def test_gemv_replays_in_a_cuda_graph():
    packed = random_packed("Q4_K", 512, 1024, seed=3)
    x = torch.zeros(1, 1024, device="cuda", dtype=torch.bfloat16)
    triton_gguf.gemv(x, packed, TYPES["Q4_K"])  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_gguf.gemv(x, packed, TYPES["Q4_K"])
    x.copy_(torch.randn(1, 1024, device="cuda").to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    expected = triton_gguf.gemv(x, packed, TYPES["Q4_K"])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("num_tokens", [1, 8, 100])  # GEMV, small GEMM, dequantize + cuBLAS
def test_a_mixed_type_layer_on_cuda_matches_the_cpu_layer(num_tokens):
    shards = [("Q4_K", 256), ("Q4_K", 128), ("Q6_K", 128)]
    layers = {dev: make_linear(512, tuple(r for _, r in shards), torch.float32, torch.device(dev), "gguf")
              for dev in ("cpu", "cuda")}
    for index, (name, rows) in enumerate(shards):
        data = random_packed(name, rows, 512, seed=index)
        for dev, layer in layers.items():
            layer.load(index, "weight", PackedGgufTensor(data.to(dev), TYPES[name], name, (rows, 512)))
    for layer in layers.values():
        layer.finish_loading()
    x = torch.randn(num_tokens, 512)
    expected = layers["cpu"](x)
    got = layers["cuda"](x.cuda().to(torch.bfloat16)).float().cpu()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2


def k_form_layer(dtype: torch.dtype, k: int = 256 * 5) -> tuple[object, list[tuple[str, torch.Tensor]]]:
    """A CUDA gguf layer of Q4_K, Q6_K and Q4_K shards in `dtype`, and its shards' packed rows."""
    shards = [("Q4_K", 256), ("Q6_K", 128), ("Q4_K", 136)]
    layer = make_linear(k, tuple(rows for _, rows in shards), dtype, torch.device("cuda"), "gguf")
    datas = []
    for index, (name, rows) in enumerate(shards):
        data = random_packed(name, rows, k, seed=10 + index)
        layer.load(index, "weight", PackedGgufTensor(data, TYPES[name], name, (rows, k)))
        datas.append((name, data))
    layer.finish_loading()
    return layer, datas


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 2, 20, 100, 300])  # split GEMV, words tiles, words dequant + cuBLAS
def test_q4_k_served_in_16_bits_is_held_in_the_k_form_and_multiplies_as_the_file_says(num_tokens, dtype):
    """Q4_K parts take int_quant's K-quant form (the words kernels), the Q6_K part its GGUF kernels; the
    layer's weights are the file's bit for bit, its bytes 148 a Q4_K block, its product the dequantized one."""
    layer, datas = k_form_layer(dtype)
    assert [part.k_form for part in layer.parts] == [True, False, True]
    expected_w = torch.cat([gguf.dequantize(data, TYPES[name]) for name, data in datas])
    assert torch.equal(layer.dequantized().weight, expected_w.to(dtype))
    q4_k_blocks = (256 + 136) * 5
    assert layer.packed_bytes() == q4_k_blocks * 148 + datas[1][1].numel()
    x = torch.randn(num_tokens, 256 * 5, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    got = layer(x.to(dtype))
    expected = x.to(dtype).float() @ expected_w.T
    assert got.shape == (num_tokens, 520) and got.dtype == dtype
    assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2


def test_the_k_form_dequantizer_writes_the_weights_dequantized_at_load():
    from fitserve.kernels import triton_int_quant

    packed = random_packed("Q4_K", 70, 256 * 3, seed=7)
    qweight, sub_scales, sub_mins, supers = gguf.q4_k_words_form(packed)
    x = torch.randn(300, 256 * 3, device="cuda").to(torch.bfloat16)
    got = triton_int_quant.dequant_mm(x, qweight, sub_scales, sub_mins, 4, supers)
    weight = gguf.dequantize(packed, TYPES["Q4_K"], torch.bfloat16)
    scratch = triton_int_quant.dequant_scratch(70 * 256 * 3, torch.bfloat16, x.device).view(70, 256 * 3)
    assert torch.equal(scratch, weight)
    torch.testing.assert_close(got, x @ weight.t(), rtol=2e-2, atol=2e-2)


def test_the_k_form_split_gemv_replays_in_a_cuda_graph():
    layer, _ = k_form_layer(torch.bfloat16, k=256 * 16)
    x = torch.zeros(1, 256 * 16, device="cuda", dtype=torch.bfloat16)
    layer(x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    for seed in (1, 2):
        x.copy_(torch.randn(1, 256 * 16, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, layer(x))
