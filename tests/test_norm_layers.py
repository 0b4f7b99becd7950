"""The norm layers' CPU path (the specification the CUDA kernels are tested against): Gemma's (1 + w)
form, the per-head q/k norms alone and as a pair, and the fp8 hand-off that the CPU leaves to the layer."""

from __future__ import annotations

import torch

from fitserve.kernels import reference
from fitserve.layers.norm import GemmaHeadRMSNorm, GemmaRMSNorm, HeadRMSNorm, RMSNorm, norm_q_and_k

CPU = torch.device("cpu")


def test_head_norms_start_as_the_identity_scale_of_their_form():
    x = torch.randn(3, 4 * 64)
    plain, _ = reference.rms_norm(x.reshape(-1, 64), torch.ones(64), 1e-6)
    for cls in (HeadRMSNorm, GemmaHeadRMSNorm):
        torch.testing.assert_close(cls(64, 1e-6, torch.float32, CPU)(x), plain.view(3, -1))


def test_q_and_k_pair_equals_each_norm_on_its_slice():
    torch.manual_seed(0)
    qkv = torch.randn(5, (4 + 2 + 2) * 32)
    q, k, _ = qkv.split([128, 64, 64], dim=-1)
    for cls, ref in ((HeadRMSNorm, reference.rms_norm), (GemmaHeadRMSNorm, reference.gemma_rms_norm)):
        q_norm, k_norm = cls(32, 1e-6, torch.float32, CPU), cls(32, 1e-6, torch.float32, CPU)
        q_norm.weight.normal_(0, 0.3)
        k_norm.weight.normal_(0, 0.3)
        got_q, got_k = norm_q_and_k(q, k, q_norm, k_norm)
        assert torch.equal(got_q, ref(q.reshape(-1, 32), q_norm.weight, 1e-6)[0].view(5, -1))
        assert torch.equal(got_k, ref(k.reshape(-1, 32), k_norm.weight, 1e-6)[0].view(5, -1))
        assert not torch.allclose(got_q[:, :32], ref(q[:, :32], k_norm.weight, 1e-6)[0]), "each its own weight"


def test_gemma_norm_scales_by_one_plus_weight_and_leaves_fp8_to_the_layer_on_cpu():
    torch.manual_seed(1)
    x, residual = torch.randn(4, 96).half(), torch.randn(4, 96).half()
    gemma = GemmaRMSNorm(96, 1e-6, torch.float16, CPU)
    gemma.weight.normal_(0, 0.3)
    llama = RMSNorm(96, 1e-6, torch.float16, CPU)
    llama.weight.copy_(gemma.weight + 1)
    out, summed = gemma(x, residual, quantize=True)  # the CPU hands plain rows on; the fp8 layer quantizes
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float16
    want, want_sum = reference.gemma_rms_norm(x, gemma.weight, 1e-6, residual)
    assert torch.equal(out, want) and torch.equal(summed, want_sum)
    # (1 + w) in float32 before one rounding: within a rounding of Llama's form with weight 1 + w
    torch.testing.assert_close(out, llama(x, residual)[0], atol=4e-3, rtol=4e-3)


def test_gemma_post_norm_then_residual_then_pre_norm_is_the_two_norms():
    torch.manual_seed(2)
    post, pre = GemmaRMSNorm(96, 1e-6, torch.float16, CPU), GemmaRMSNorm(96, 1e-6, torch.float16, CPU)
    post.weight.normal_(0, 0.3)
    pre.weight.normal_(0, 0.3)
    x, residual = torch.randn(4, 96).half() * 4, torch.randn(4, 96).half()
    out, summed = pre.after(post, x, residual)
    want_out, want_sum = pre(post(x)[0], residual)
    assert torch.equal(out, want_out) and torch.equal(summed, want_sum)
    assert not torch.equal(summed, x + residual), "x is normed before the add"
