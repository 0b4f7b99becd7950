"""The integer group-quantized GEMM on the GPU (kernels/triton_int_quant.py) against its specification,
and a GPTQ checkpoint served on CUDA as on the CPU (GPU only)."""

from __future__ import annotations

import pytest
import torch

from fitserve.kernels import int_quant

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from fitserve.kernels import triton_int_quant  # noqa: E402  (imports triton, present with CUDA torch)

CUDA = torch.device("cuda")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("num_rows", [1, 4, 7, 16, 17, 64, 300])
@pytest.mark.parametrize("num_cols,inner,group_size", [(4096, 4096, 128), (1000, 576, 32), (70, 256, -1)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_the_reference(bits, num_rows, num_cols, inner, group_size, act_order, dtype):
    gen = torch.Generator(device=CUDA).manual_seed(0)
    groups = 1 if group_size == -1 else inner // group_size
    values = torch.randint(0, 1 << bits, (num_cols, inner), device=CUDA, dtype=torch.uint8, generator=gen)
    qweight = int_quant.store_values(values, bits)
    scales = torch.rand(num_cols, groups, device=CUDA, generator=gen) * 0.01 + 1e-3
    zeros = torch.randint(0, 1 << bits, (num_cols, groups), device=CUDA, dtype=torch.uint8, generator=gen)
    g_idx = None
    if act_order:
        g_idx = (torch.randperm(inner, device=CUDA, generator=gen) * groups // inner).to(torch.int32)
    x = torch.randn(num_rows, inner, device=CUDA, generator=gen).to(dtype)
    got = triton_int_quant.int_quant_mm(x, qweight, scales, zeros, g_idx, bits)
    expected = int_quant.int_quant_mm_reference(x, qweight, scales, zeros, g_idx, bits)
    err = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    assert got.dtype == dtype and err < 4e-3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("path", ["gemv", "tile_gemm"])
@pytest.mark.parametrize("num_rows", [1, 3, 40])
@pytest.mark.parametrize("group_size,act_order", [(128, False), (32, False), (128, True)])
def test_each_path_matches_the_reference(bits, path, num_rows, group_size, act_order):
    """Every path at row counts int_quant_mm would not give it (its thresholds may change)."""
    gen = torch.Generator(device=CUDA).manual_seed(1)
    num_cols, inner = 328, 1280
    groups = inner // group_size
    qweight = int_quant.store_values(
        torch.randint(0, 1 << bits, (num_cols, inner), device=CUDA, dtype=torch.uint8, generator=gen), bits)
    scales = torch.rand(num_cols, groups, device=CUDA, generator=gen) * 0.01 + 1e-3
    zeros = torch.randint(0, 1 << bits, (num_cols, groups), device=CUDA, dtype=torch.uint8, generator=gen)
    g_idx = (torch.randperm(inner, device=CUDA, generator=gen) * groups // inner).to(torch.int32) if act_order else None
    x = torch.randn(num_rows, inner, device=CUDA, generator=gen).to(torch.bfloat16)
    got = getattr(triton_int_quant, path)(x, qweight, scales, zeros, g_idx, bits)
    expected = int_quant.int_quant_mm_reference(x, qweight, scales, zeros, g_idx, bits)
    assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < 4e-3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("num_cols,inner,group_size", [(328, 1280, 128), (70, 576, 32), (1000, 4096, -1)])
@pytest.mark.parametrize("num_rows", [1, 40, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequant_mm_matches_the_reference(bits, num_cols, inner, group_size, num_rows, dtype):
    """The many-rows path (dequantize into the scratch, then cuBLAS) at shapes that leave partial tiles,
    after a larger layer has grown the shared scratch (the smaller one uses its front)."""
    big = random_layer(bits, 2048, 4096, 128, False, seed=7)
    triton_int_quant.dequant_mm(torch.randn(8, 4096, device=CUDA).to(dtype), *big[:3], bits)
    qweight, scales, zeros, _ = random_layer(bits, num_cols, inner, group_size, False, seed=num_rows)
    x = torch.randn(num_rows, inner, device=CUDA).to(dtype)
    got = triton_int_quant.dequant_mm(x, qweight, scales, zeros, bits)
    expected = int_quant.int_quant_mm_reference(x, qweight, scales, zeros, None, bits)
    assert got.dtype == dtype and got.shape == (num_rows, num_cols)
    assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < 4e-3
    weight = triton_int_quant.dequant_scratch(num_cols * inner, dtype, x.device).view(num_cols, inner)
    assert torch.equal(weight, int_quant.dequantize(qweight, scales, zeros, None, bits, dtype))  # one rounding


def random_layer(bits, num_cols, inner, group_size, act_order, seed):
    """A layer in int_quant's layout on CUDA: (qweight, scales, zeros, g_idx)."""
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    groups = 1 if group_size == -1 else inner // group_size
    qweight = int_quant.store_values(
        torch.randint(0, 1 << bits, (num_cols, inner), device=CUDA, dtype=torch.uint8, generator=gen), bits)
    scales = torch.rand(num_cols, groups, device=CUDA, generator=gen) * 0.01 + 1e-3
    zeros = torch.randint(0, 1 << bits, (num_cols, groups), device=CUDA, dtype=torch.uint8, generator=gen)
    g_idx = (torch.randperm(inner, device=CUDA, generator=gen) * groups // inner).to(torch.int32) if act_order else None
    return qweight, scales, zeros, g_idx


# Row counts in every bucket of every table (GEMV at 1, tiles of 16, 32, 64 and 128 rows, partial tiles)
VARIANT_ROWS = (1, 2, 16, 17, 33, 64, 100)


@pytest.mark.parametrize("variant", list(triton_int_quant.VARIANTS))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size,act_order", [(128, False), (32, False), (-1, False), (128, True)])
def test_every_variant_matches_the_reference(variant, bits, group_size, act_order):
    """Each kernel table (benchmarks/int_quant_bench.py --variant) at rows in each of its buckets, through
    int_quant_mm and both paths; 1152 inputs: 9 groups of 128, 36 of 32, or one of 144 or 288 words."""
    table = triton_int_quant.VARIANTS[variant]
    qweight, scales, zeros, g_idx = random_layer(bits, 328, 1152, group_size, act_order, seed=2)
    gen = torch.Generator(device=CUDA).manual_seed(3)
    for num_rows in VARIANT_ROWS:
        x = torch.randn(num_rows, 1152, device=CUDA, generator=gen).to(torch.bfloat16)
        expected = int_quant.int_quant_mm_reference(x, qweight, scales, zeros, g_idx, bits).float()
        for fn in (triton_int_quant.int_quant_mm, triton_int_quant.gemv, triton_int_quant.tile_gemm):
            got = fn(x, qweight, scales, zeros, g_idx, bits, table)
            err = ((got.float() - expected).norm() / expected.norm()).item()
            assert got.dtype == torch.bfloat16 and err < 4e-3, (fn.__name__, num_rows, err)


@pytest.mark.parametrize("num_rows", [1, 5, 40])
def test_words_kernels_in_fp16_on_odd_columns(num_rows):
    """fp16 activations, 8-bit per-channel rows of 72 words (segments of 8) and 4-bit groups of 64."""
    from fitserve.kernels import triton_int_words
    for bits, inner, group_size in ((8, 288, -1), (4, 576, 64)):
        qweight, scales, zeros, _ = random_layer(bits, 77, inner, group_size, False, seed=4)
        x = torch.randn(num_rows, inner, device=CUDA).to(torch.float16)
        got = triton_int_words.gemv_words(x, qweight, scales, zeros, bits, 8, 256, 4) if num_rows == 1 else (
            triton_int_words.tile_words(x, qweight, scales, zeros, bits, 16, 32, 64, 4, 3))
        expected = int_quant.int_quant_mm_reference(x, qweight, scales, zeros, None, bits).float()
        assert ((got.float() - expected).norm() / expected.norm()).item() < 4e-3


@pytest.mark.parametrize("kernel", ["tile", "swapped tile", "gemv"])
def test_split_k_products_are_exact_and_repeat_in_a_graph(kernel):
    """K cut into ranges (4 for the tiles; the GEMV's min_programs cuts the 1152-input layer into 2 and the
    4096 one into 4): within the reference's rounding, the same bits every time (the last program of a tile
    adds the partial sums in order), and the tile counters reset, eagerly and replayed in a graph beside a
    layer of another shape (the shared partial-sum buffer and counters)."""
    from fitserve.kernels import triton_int_words
    layers = [random_layer(4, 4096, 4096, 128, False, seed=8)[:3], random_layer(4, 1000, 1152, 32, False, seed=9)[:3]]
    rows = 1 if kernel == "gemv" else 20
    xs = [torch.randn(rows, 4096, device=CUDA).to(torch.bfloat16),
          torch.randn(rows, 1152, device=CUDA).to(torch.bfloat16)]
    assert triton_int_words.gemv_split(4, 256, 1024) == (4, 1)
    assert triton_int_words.gemv_split(5, 63, 1024) == (5, 1) and triton_int_words.gemv_split(5, 500, 1024) == (3, 2)

    def product(x, layer):
        if kernel == "gemv":  # 16 columns, 128 words a step: 4 steps of K 4096, 2 of 1152 (groups of 32)
            return triton_int_words.gemv_words(x, *layer, 4, 16, 128, 4, min_programs=4096)
        return triton_int_words.tile_words(x, *layer, 4, 32, 64, 128, 4, 3, swap=kernel == "swapped tile", split_k=4)

    def step():
        return [product(x, layer) for x, layer in zip(xs, layers)]

    first = step()
    for got, x, layer in zip(first, xs, layers):
        expected = int_quant.int_quant_mm_reference(x, *layer, None, 4).float()
        assert ((got.float() - expected).norm() / expected.norm()).item() < 4e-3
    assert all(torch.equal(a, b) for a, b in zip(first, step()))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(3):
        graph.replay()
        assert all(torch.equal(a, b) for a, b in zip(first, captured))
    assert all(torch.equal(a, b) for a, b in zip(first, step()))


def test_words_kernels_take_whole_word_groups_in_order():
    from fitserve.kernels import triton_int_words
    qweight, scales, _, g_idx = random_layer(4, 64, 256, 128, True, seed=5)
    assert triton_int_words.words_take(qweight, scales, None, 4)
    assert not triton_int_words.words_take(qweight, scales, g_idx, 4)  # act-order: the bytes kernels
    assert not triton_int_words.words_take(qweight[:, 1:], scales, None, 4)  # rows not whole words
    odd = int_quant.store_values(torch.zeros(64, 12, device=CUDA, dtype=torch.uint8), 4)  # 6 bytes a row
    assert not triton_int_words.words_take(odd, scales[:, :1], None, 4)


def test_gptq_checkpoint_on_cuda_matches_the_cpu_path(tmp_path):
    from fitserve.models.loader import load_model
    from fitserve.weights.source import resolve_model_source
    from fitserve.config import EngineConfig
    from paged_helpers import PagedDriver
    from test_int_quant import quantized_checkpoint

    quantized_checkpoint(tmp_path, "gptq", act_order=True)
    source = resolve_model_source(EngineConfig(model=str(tmp_path)))
    drivers = []
    for device in ("cpu", "cuda"):
        model = load_model(source, torch.bfloat16, torch.device(device), progress=False)
        drivers.append(PagedDriver(model, num_blocks=16, block_size=16, device=device))
    for step in ([("a", list(range(1, 40))), ("b", list(range(50, 57)))], [("a", [5]), ("b", [7])]):
        cpu, gpu = drivers[0].step(step), drivers[1].step(step).cpu()
        assert ((gpu - cpu).norm() / cpu.norm()).item() < 3e-2
