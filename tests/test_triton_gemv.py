"""The one-row Triton GEMV and the skinny GEMM (2-32 rows) against a float64 product (GPU only):
awkward sizes, both 16-bit dtypes, inside a CUDA graph, and the layers that route to them."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from fitserve.kernels import triton_gemv, triton_skinny  # noqa: E402  (triton comes with CUDA torch)
from fitserve.layers.linear import Linear, linear  # noqa: E402


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x.double() @ weight.double().T).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows,k", [(1, 64), (7, 100), (1000, 4096), (4099, 1030), (6144, 4096), (4096, 14336),
                                        (33, 2049)])
def test_gemv_matches_a_float64_product(dtype, num_rows, k):
    gen = torch.Generator(device="cuda").manual_seed(num_rows + k)
    x = torch.randn(1, k, generator=gen, device="cuda").to(dtype)
    weight = (torch.randn(num_rows, k, generator=gen, device="cuda") / k ** 0.5).to(dtype)
    got = triton_gemv.gemv(x, weight)
    expected = reference(x, weight)
    assert got.shape == (1, num_rows) and got.dtype == dtype
    # Products summed in float32, rounded once: within a unit of the output dtype's last place.
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
    cublas_error = (torch.nn.functional.linear(x, weight).float() - expected.float()).abs().max()
    assert (got.float() - expected.float()).abs().max() <= 2 * cublas_error + 1e-3, "no worse than cuBLAS"


def test_gemv_replays_in_a_cuda_graph():
    weight = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16)
    x = torch.zeros(1, 512, device="cuda", dtype=torch.bfloat16)
    triton_gemv.gemv(x, weight)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_gemv.gemv(x, weight)
    for seed in range(3):
        x.copy_(torch.randn(1, 512, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda"))
        graph.replay()
        torch.testing.assert_close(out.float(), reference(x, weight).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows", [2, 3, 16, 17, 24, 32])
@pytest.mark.parametrize("num_cols,k", [(4096, 4096), (4099, 14336), (28672, 4096), (33, 768), (6144, 256)])
def test_skinny_mm_matches_a_float64_product(dtype, num_rows, num_cols, k):
    gen = torch.Generator(device="cuda").manual_seed(num_rows * 7 + num_cols + k)
    x = torch.randn(num_rows, k, generator=gen, device="cuda").to(dtype)
    weight = (torch.randn(num_cols, k, generator=gen, device="cuda") / k ** 0.5).to(dtype)
    got = triton_skinny.skinny_mm(x, weight)
    expected = reference(x, weight)
    assert got.shape == (num_rows, num_cols) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(got, triton_skinny.skinny_mm(x, weight)), "the same bytes every run"


def test_skinny_mm_replays_in_a_cuda_graph():
    weight = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16) / 120
    x = torch.zeros(24, 14336, device="cuda", dtype=torch.bfloat16)
    triton_skinny.skinny_mm(x, weight)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_skinny.skinny_mm(x, weight)
    for seed in range(3):
        x.copy_(torch.randn(24, 14336, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda"))
        graph.replay()
        torch.testing.assert_close(out.float(), reference(x, weight).float(), rtol=1e-2, atol=1e-2)


def test_layers_route_rows_by_count(monkeypatch):
    layer = Linear(256, (300, 200), torch.bfloat16, torch.device("cuda"))
    layer.weight.data.normal_()
    calls = []
    for module, name in ((triton_gemv, "gemv"), (triton_skinny, "skinny_mm")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda x, w, original=original, name=name:
                            calls.append((name, x.shape[0])) or original(x, w))
    for rows in (1, 2, 32, 33):
        x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight), rtol=1e-2, atol=5e-2)
    one = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    linear(one.float(), layer.weight.float())  # float32: cuBLAS
    linear(one[:, ::2], layer.weight[:, :128])  # a strided row: cuBLAS
    assert calls == [("gemv", 1), ("skinny_mm", 2), ("skinny_mm", 32)]
