"""The fused MoE Triton kernel against the pure-torch reference (GPU only): random routings of awkward
sizes (one token, odd counts, experts no token chose, more choices than the small-batch tile), the
align step's grouping, a Mixtral-shaped model against its CPU path, and decode inside a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from fitserve.kernels import moe_reference

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from fitserve.kernels import triton_moe  # noqa: E402  (triton comes with CUDA torch)

# (tokens, hidden, intermediate, experts, top_k)
SHAPES = [(1, 64, 48, 8, 2), (7, 40, 24, 6, 2), (37, 128, 96, 8, 2), (150, 64, 80, 5, 3), (300, 256, 128, 16, 8)]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # relative to the largest output


def random_moe(num_tokens, hidden, inter, num_experts, top_k, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen, device="cuda").to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen, device="cuda") * hidden ** -0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen, device="cuda") * inter ** -0.5).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device="cuda")
    logits[:, -1] = -1e4  # the last expert is never chosen: an empty run
    weights, ids = moe_reference.route(logits, top_k, renormalize=seed % 2 == 0)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_moe_matches_the_reference(shape, dtype):
    x, w13, w2, weights, ids = random_moe(*shape, dtype, seed=shape[0])
    got = triton_moe.fused_moe(x, w13, w2, weights, ids).float()
    want = moe_reference.experts(x.float(), w13.float(), w2.float(), weights, ids)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOLERANCE[dtype] * want.abs().max()


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_groups_every_choice_once_by_expert(block_m):
    _, _, _, _, ids = random_moe(37, 8, 8, 8, 2, torch.float32, seed=1)
    sorted_ids, block_experts, num_padded = triton_moe.align_to_experts(ids, 8, block_m)
    used = sorted_ids[:int(num_padded)].long()
    assert int(num_padded) % block_m == 0
    assert sorted(used[used < ids.numel()].tolist()) == list(range(ids.numel()))
    for block in range(int(num_padded) // block_m):
        rows = used[block * block_m:(block + 1) * block_m]
        rows = rows[rows < ids.numel()]
        assert rows.numel() > 0 and (ids.reshape(-1)[rows] == block_experts[block]).all()


def test_fused_moe_replays_in_a_cuda_graph():
    """No host sync in align or the kernels: a captured decode step replays on new routings."""
    x, w13, w2, weights, ids = random_moe(4, 64, 48, 8, 2, torch.bfloat16, seed=3)
    triton_moe.fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_moe.fused_moe(x, w13, w2, weights, ids)
    x2, _, _, weights2, ids2 = random_moe(4, 64, 48, 8, 2, torch.bfloat16, seed=4)
    for buffer, new in ((x, x2), (weights, weights2), (ids, ids2)):
        buffer.copy_(new)
    graph.replay()
    want = moe_reference.experts(x.float(), w13.float(), w2.float(), weights, ids)
    assert (out.float() - want).abs().max() <= 2e-2 * want.abs().max()


def test_a_tiny_mixtral_on_cuda_matches_its_cpu_path(tmp_path):
    from hf_compare_helpers import load_ours
    from moe_helpers import write_moe_checkpoint
    from paged_helpers import PagedDriver
    from fitserve.models.loader import load_model

    write_moe_checkpoint(tmp_path, "mixtral")
    source, cpu_model = load_ours(tmp_path)
    gpu_model = load_model(source, torch.float32, torch.device("cuda"), progress=False)
    prompts = {"a": list(range(3, 40)), "b": [5, 9, 17]}
    cpu = PagedDriver(cpu_model, num_blocks=32, block_size=16).step(list(prompts.items()))
    gpu = PagedDriver(gpu_model, num_blocks=32, block_size=16, device="cuda").step(list(prompts.items()))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 8, 2), (7, 8, 2), (300, 128, 8), (5, 60, 4), (3, 3, 3)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_kernel_matches_reference(dtype, num_tokens, num_experts, top_k, renormalize):
    """softmax, top-k and renormalization in one kernel: the same experts (in the same order, save equal
    or one-rounding-apart probabilities, which the two softmaxes may order differently) and weights as
    moe_reference.route."""
    gen = torch.Generator(device="cuda").manual_seed(num_tokens * num_experts)
    logits = (torch.randn(num_tokens, num_experts, generator=gen, device="cuda") * 2).to(dtype)
    weights, ids = triton_moe.route(logits, top_k, renormalize)
    ref_weights, ref_ids = moe_reference.route(logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    probs = torch.softmax(logits.float(), -1)
    # the chosen experts' probabilities, best first: another expert only where two are (nearly) equal
    torch.testing.assert_close(probs.gather(1, ids), probs.gather(1, ref_ids), atol=1e-7, rtol=1e-5)
    assert all(len(set(row)) == top_k for row in ids.tolist()), "k distinct experts per token"
