"""bf16 matmuls on a CPU without bf16 units (kernels/cpu_matmul.py): several rows are multiplied in
float32 from the bf16 operands, whole or a slice of output features at a time, and rounded once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fitserve.kernels import cpu_matmul
from fitserve.layers.linear import linear


def _operands(rows: int, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    w = torch.randn(out_features, in_features, generator=gen).bfloat16()
    return x, w


@pytest.mark.parametrize("slice_bytes", [8 << 20, 4 * 40 * 7, 4 * 40])  # whole; 7-row slices (a ragged last one); one row
@pytest.mark.parametrize("rows", [2, 5, 16])
def test_the_widened_product_is_the_float32_product_of_the_bf16_operands_rounded_once(monkeypatch, rows, slice_bytes):
    monkeypatch.setattr(cpu_matmul, "WIDEN_SLICE_BYTES", slice_bytes)
    x, w = _operands(rows, 75, 40)
    got = cpu_matmul.linear_bf16_widened(x, w)
    want = (x.double() @ w.double().T).bfloat16()  # exact products and sums, one rounding
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 75)
    # float32 sums of 40 products of bf16 values round to the same bf16 as exact ones except at a tie:
    # allow one bf16 step
    assert torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)
    # torch's own bf16 matmul does the same arithmetic (bf16 in, float32 sums, one rounding)
    assert torch.allclose(got.float(), F.linear(x, w).float(), rtol=2 ** -7, atol=1e-6)


def test_linear_takes_the_widened_path_for_several_bf16_rows_on_a_cpu_without_bf16_units(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_matmul, "cpu_has_bf16_units", lambda: False)
    monkeypatch.setattr(cpu_matmul, "linear_bf16_widened", lambda x, w: calls.append(x.shape[0]) or F.linear(x, w))
    x, w = _operands(4, 24, 16)
    linear(x, w)  # 4 bf16 rows: widened
    linear(x[:1], w)  # one row: torch's bf16 GEMV, which reads half float32's bytes
    linear(x.float(), w.float())  # float32: MKL as it is
    assert calls == [4]
    monkeypatch.setattr(cpu_matmul, "cpu_has_bf16_units", lambda: True)
    linear(x, w)  # bf16 units: torch multiplies bf16 natively
    assert calls == [4]


def test_the_linear_layer_result_does_not_depend_on_the_path(monkeypatch):
    """One row through torch's bf16 GEMV and the same row inside a batch through the widened path agree
    to bf16 rounding: a request's tokens do not depend on what it is batched with beyond that."""
    monkeypatch.setattr(cpu_matmul, "cpu_has_bf16_units", lambda: False)
    x, w = _operands(6, 300, 96)
    batched = linear(x, w)
    alone = torch.cat([linear(x[i:i + 1], w) for i in range(6)])
    assert torch.allclose(batched.float(), alone.float(), rtol=2 ** -7, atol=1e-6)


def test_a_compiled_step_traces_the_bf16_linear_without_a_graph_break():
    """`--cpu-compile decode` traces linear() whole (fullgraph): the bf16-units check must be a value
    dynamo can read. It once called torch.cpu's feature queries, which dynamo refuses, and every bf16
    compiled start-up failed."""
    x, w = _operands(4, 24, 16)
    compiled = torch.compile(linear, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, w), linear(x, w))
    assert torch.equal(compiled(x[:1], w), linear(x[:1], w))
