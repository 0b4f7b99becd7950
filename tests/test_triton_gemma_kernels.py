"""The Triton kernels of Gemma's (1 + w) RMSNorm, the per-head q/k norms and GELU-tanh-and-multiply
against the pure-torch reference on awkward shapes (GPU only): Gemma 3 12B's hidden 3840 (not a power
of two), head_dim 256, 1 / 7 / 300 rows, with and without the fused residual add."""

from __future__ import annotations

import pytest
import torch

from fitserve.kernels import fp8, reference

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from fitserve.kernels import triton_fp8, triton_fused  # noqa: E402  (triton comes with CUDA torch)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# tolerances: one rounding of the model dtype apart (the kernels' reductions sum in another order)
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 2e-5}


def _randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 7, 300])
@pytest.mark.parametrize("hidden", [3840, 1152])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gemma_rms_norm_matches_reference(dtype, num_rows, hidden, with_residual):
    torch.manual_seed(num_rows)
    x = _randn(num_rows, hidden, dtype=dtype)
    residual = _randn(num_rows, hidden, dtype=dtype) if with_residual else None
    weight = _randn(hidden, dtype=dtype, scale=0.3)  # centred on 0, as Gemma checkpoints hold it
    ref_out, ref_sum = reference.gemma_rms_norm(x, weight, 1e-6, residual)
    out, total = triton_fused.rms_norm(x, weight, 1e-6, residual, weight_offset=1.0)
    assert torch.equal(total, ref_sum), "the residual sum is rounded the same way"
    torch.testing.assert_close(out, ref_out, atol=TOL[dtype], rtol=TOL[dtype])
    # not Llama's form: the offset is applied (a kernel ignoring it would be off by about x itself)
    assert (out.float() - reference.rms_norm(x, weight, 1e-6, residual)[0].float()).abs().max() > 0.1


@pytest.mark.parametrize("num_rows", [1, 7, 300])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gemma_rms_norm_quant_is_the_norm_then_quantize(num_rows, with_residual):
    x = _randn(num_rows, 3840, dtype=torch.bfloat16)
    residual = torch.randn_like(x) if with_residual else None
    weight = _randn(3840, dtype=torch.bfloat16, scale=0.3)
    out, summed = triton_fused.rms_norm(x, weight, 1e-6, residual, weight_offset=1.0)
    q, scale, fused_sum = triton_fused.rms_norm_quant(x, weight, 1e-6, residual, weight_offset=1.0)
    ref_q, ref_scale = triton_fp8.quantize_per_token(out)
    assert torch.equal(fused_sum, summed) and torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 7, 300])
@pytest.mark.parametrize("quantize", [False, True])
def test_post_norm_add_pre_norm_in_one_kernel_matches_reference(dtype, num_rows, quantize):
    """Gemma's post-attention norm, the residual add and the pre-feedforward norm (x_weight: the first)."""
    x, residual = _randn(num_rows, 3840, dtype=dtype, scale=4.0), _randn(num_rows, 3840, dtype=dtype)
    post_weight, pre_weight = _randn(3840, dtype=dtype, scale=0.3), _randn(3840, dtype=dtype, scale=0.3)
    post, _ = reference.gemma_rms_norm(x, post_weight, 1e-6)
    ref_out, ref_sum = reference.gemma_rms_norm(post, pre_weight, 1e-6, residual)
    out, total = triton_fused.rms_norm(x, pre_weight, 1e-6, residual, 1.0, x_weight=post_weight)
    torch.testing.assert_close(total, ref_sum, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(out, ref_out, atol=TOL[dtype], rtol=TOL[dtype])
    two_kernels = triton_fused.rms_norm(triton_fused.rms_norm(x, post_weight, 1e-6, None, 1.0)[0], pre_weight, 1e-6,
                                        residual, 1.0)
    if dtype == torch.float32:  # no rounding between the norms to match: the compilers' FMA choices differ
        torch.testing.assert_close(total, two_kernels[1], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out, two_kernels[0], atol=1e-6, rtol=1e-6)
    else:  # the post-norm value rounded to the model dtype before the add, as two kernels round it
        assert torch.equal(total, two_kernels[1]) and torch.equal(out, two_kernels[0]), "rounded as the two kernels"
    if quantize and dtype != torch.float32:
        q, scale, fused_sum = triton_fused.rms_norm_quant(x, pre_weight, 1e-6, residual, 1.0, x_weight=post_weight)
        ref_q, ref_scale = triton_fp8.quantize_per_token(out)
        assert torch.equal(fused_sum, total) and torch.equal(scale, ref_scale)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 7, 300])
@pytest.mark.parametrize("head_dim,num_heads", [(256, 16), (256, 1), (128, 8), (96, 3)])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_qk_norms_on_qkv_slices_match_reference(dtype, num_rows, head_dim, num_heads, weight_offset):
    """q and k as column slices of one qkv row (Gemma 3 12B: 16 q heads, 8 kv heads of 256), each with its
    own weight, normed in one launch in place of the copies the torch form makes; and one alone."""
    num_kv_heads = max(1, num_heads // 2)
    sizes = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
    qkv = _randn(num_rows, sum(sizes), dtype=dtype)
    q, k, _ = qkv.split(sizes, dim=-1)
    q_weight, k_weight = _randn(head_dim, dtype=dtype, scale=0.3), _randn(head_dim, dtype=dtype, scale=0.3)
    ref_norm = reference.gemma_rms_norm if weight_offset else reference.rms_norm
    refs = [ref_norm(part.reshape(-1, head_dim), weight, 1e-6)[0].view(num_rows, -1)
            for part, weight in ((q, q_weight), (k, k_weight))]
    got = triton_fused.qk_rms_norm(q, k, q_weight, k_weight, 1e-6, weight_offset)
    for out, ref, part in zip(got, refs, (q, k)):
        assert out.is_contiguous() and out.shape == part.shape
        torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    alone = triton_fused.head_rms_norm(k, k_weight, 1e-6, weight_offset)
    torch.testing.assert_close(alone, refs[1], atol=TOL[dtype], rtol=TOL[dtype])


EDGE_GATES = [-30.0, -10.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 30.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 7, 300])
@pytest.mark.parametrize("inter", [15360, 1000])
def test_gelu_tanh_and_mul_matches_reference(dtype, num_rows, inter):
    gate_up = _randn(num_rows, 2 * inter, dtype=dtype, scale=3.0)
    gate_up[0, :len(EDGE_GATES)] = torch.tensor(EDGE_GATES, device="cuda").to(dtype)  # the tails of tanh
    got = triton_fused.gelu_tanh_and_mul(gate_up)
    torch.testing.assert_close(got, reference.gelu_tanh_and_mul(gate_up), atol=TOL[dtype], rtol=TOL[dtype])
    assert not torch.allclose(got, reference.silu_and_mul(gate_up), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("num_rows", [1, 7, 300])
def test_gelu_tanh_and_mul_quant_is_gelu_then_quantize(num_rows):
    gate_up = _randn(num_rows, 2 * 15360, dtype=torch.bfloat16, scale=3.0)
    q, scale = triton_fused.gelu_tanh_and_mul_quant(gate_up)
    ref_q, ref_scale = triton_fp8.quantize_per_token(triton_fused.gelu_tanh_and_mul(gate_up))
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    dequantized = fp8.dequantize(q, scale, torch.float32)
    torch.testing.assert_close(dequantized, reference.gelu_tanh_and_mul(gate_up).float(), atol=0.1, rtol=0.07)


def test_gemma_layers_take_the_kernels_on_cuda():
    """GemmaRMSNorm / GemmaHeadRMSNorm (alone and as a q/k pair) / gelu_tanh_and_mul on CUDA give the
    kernels' values."""
    from fitserve.layers.activation import gelu_tanh_and_mul
    from fitserve.layers.norm import GemmaHeadRMSNorm, GemmaRMSNorm, norm_q_and_k

    norm = GemmaRMSNorm(3840, 1e-6, torch.bfloat16, torch.device("cuda"))
    norm.weight.copy_(_randn(3840, dtype=torch.bfloat16, scale=0.3))
    x, residual = _randn(7, 3840, dtype=torch.bfloat16), _randn(7, 3840, dtype=torch.bfloat16)
    out, summed = norm(x, residual)
    kernel_out, kernel_sum = triton_fused.rms_norm(x, norm.weight, 1e-6, residual, weight_offset=1.0)
    assert torch.equal(out, kernel_out) and torch.equal(summed, kernel_sum)
    quantized, _ = norm(x, residual, quantize=True)
    assert torch.equal(quantized.q.view(torch.uint8), triton_fp8.quantize_per_token(out)[0].view(torch.uint8))
    q_norm, k_norm = (GemmaHeadRMSNorm(256, 1e-6, torch.bfloat16, torch.device("cuda")) for _ in range(2))
    q_norm.weight.copy_(_randn(256, dtype=torch.bfloat16, scale=0.3))
    k_norm.weight.copy_(_randn(256, dtype=torch.bfloat16, scale=0.3))
    q, k = _randn(7, 4096 + 2048, dtype=torch.bfloat16).split([4096, 2048], dim=-1)
    want_q, want_k = triton_fused.qk_rms_norm(q, k, q_norm.weight, k_norm.weight, 1e-6, 1.0)
    assert torch.equal(q_norm(q), want_q) and torch.equal(k_norm(k), want_k)
    got_q, got_k = norm_q_and_k(q, k, q_norm, k_norm)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    cpu_q, _ = norm_q_and_k(q.cpu(), k.cpu(), q_norm.cpu(), k_norm.cpu())
    torch.testing.assert_close(cpu_q, want_q.cpu(), atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])
    gate_up = _randn(7, 2 * 1000, dtype=torch.bfloat16, scale=3.0)
    assert torch.equal(gelu_tanh_and_mul(gate_up), triton_fused.gelu_tanh_and_mul(gate_up))
