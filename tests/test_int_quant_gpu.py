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
