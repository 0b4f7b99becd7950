"""The one-row Triton GEMV against torch's linear (GPU only): awkward sizes, both 16-bit dtypes,
inside a CUDA graph, and the layers that route to it."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from fitserve.kernels import triton_gemv  # noqa: E402  (triton comes with CUDA torch)
from fitserve.layers.formats.unquantized import Linear  # noqa: E402
from fitserve.layers.linear import linear  # noqa: E402


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


def test_layers_route_one_row_to_the_gemv_and_more_rows_to_cublas(monkeypatch):
    layer = Linear(256, (300, 200), torch.bfloat16, torch.device("cuda"))
    layer.weight.data.normal_()
    calls = []
    original = triton_gemv.gemv
    monkeypatch.setattr(triton_gemv, "gemv", lambda x, w: calls.append(x.shape) or original(x, w))
    one = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    two = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(layer(one), torch.nn.functional.linear(one, layer.weight), rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(layer(two), torch.nn.functional.linear(two, layer.weight))
    linear(one.float(), layer.weight.float())  # float32: cuBLAS
    linear(one[:, ::2], layer.weight[:, :128])  # a strided row: cuBLAS
    assert calls == [(1, 256)]
