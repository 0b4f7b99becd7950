"""`gpu_bench.py fusion`: the rotary + KV store fusion of a decode step on and off, on the dummy 8B model.

- the whole decode forward (32 layers, hidden states out) captured in a CUDA graph and replayed,
  with the attention layers' fuse_rotary_store (layers/attention.py) on and off;
- each attention piece alone, 32 calls (one per layer) in one graph: rotary + KV store in one
  kernel vs triton_fused.rotary_ then store_kv, and (for information) the split-context decode
  attention, split + merge kernels;
- the GPU kernels per decode forward in each setting (one eager forward under the profiler).

Batch sizes 1 and 20, every request at context CONTEXT_TOKENS. Times are GPU times from CUDA
events around graph replays: median over rounds of the mean replay.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

CONTEXT_TOKENS = 512  # tokens already cached per request; the step feeds token 513
BATCH_SIZES = (1, 20)
SETTINGS = {"fused": True, "unfused": False}  # name: PagedAttention.fuse_rotary_store
CALLS_PER_GRAPH = 32  # one per layer of the 8B model
REPLAYS_PER_ROUND = 20
ROUNDS = 7


def decode_batch(batch_size: int, block_size: int, num_blocks: int, device: torch.device):
    """A decode ForwardBatch: request i owns blocks i*n .. i*n+n-1 and feeds the token at CONTEXT_TOKENS."""
    from fitserve.forward_batch import ForwardBatch

    seq_len = CONTEXT_TOKENS + 1
    blocks_per_seq = -(-seq_len // block_size)
    assert batch_size * blocks_per_seq <= num_blocks, "the KV cache is too small for the benchmark batch"
    tables = torch.arange(batch_size * blocks_per_seq, dtype=torch.int32).view(batch_size, blocks_per_seq)
    position = CONTEXT_TOKENS
    slots = tables[:, position // block_size].long() * block_size + position % block_size
    return ForwardBatch(
        input_ids=torch.randint(0, 1000, (batch_size,), device=device),
        positions=torch.full((batch_size,), position, dtype=torch.int64, device=device),
        slot_mapping=slots.to(device),
        query_start_loc=torch.arange(batch_size + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch_size,), seq_len, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        logits_indices=torch.arange(batch_size, device=device),
        max_query_len=1, max_seq_len=seq_len, query_lens_cpu=(1,) * batch_size, seq_lens_cpu=(seq_len,) * batch_size,
    )


def graph_replay_ms(fn: Callable[[], object]) -> float:
    """GPU ms of one replay of a CUDA graph holding fn (run once eagerly first: compiles, sizes buffers)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(ROUNDS):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(REPLAYS_PER_ROUND):
            graph.replay()
        end.record()
        end.synchronize()
        rounds.append(begin.elapsed_time(end) / REPLAYS_PER_ROUND)
    del graph
    return statistics.median(rounds)


def gpu_kernels_per_call(fn: Callable[[], object]) -> int:
    """GPU kernels (and memsets/copies) one eager call of fn launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if getattr(event, "device_type", None) == DeviceType.CUDA)


def set_fuse_rotary_store(model, on: bool) -> list[bool]:
    """Set every attention layer's fusion setting (a CUDA graph keeps the one it was captured
    with); returns the settings it had."""
    from fitserve.layers.attention import PagedAttention

    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    before = [layer.fuse_rotary_store for layer in layers]
    for layer in layers:
        layer.fuse_rotary_store = on
    return before


def time_forward(model, batch, timer: Callable = graph_replay_ms, counter: Callable = gpu_kernels_per_call) -> dict:
    """The whole decode forward in every fusion setting (all timed before the profiler first runs);
    the model's own setting is restored afterwards."""
    from fitserve.layers.attention import PagedAttention

    default = set_fuse_rotary_store(model, True)
    result = {}
    try:
        for name, rotary_store in SETTINGS.items():
            set_fuse_rotary_store(model, rotary_store)
            result[name] = {"forward_ms": timer(lambda: model(batch))}
        for name, rotary_store in SETTINGS.items():
            set_fuse_rotary_store(model, rotary_store)
            try:
                kernels = counter(lambda: model(batch))
                result[name] |= {"kernels_per_forward": kernels, "kernels_per_layer": kernels / len(model.layers)}
            except Exception as error:  # the count is a by-product: keep the timings whatever the profiler does
                result[name]["kernels_error"] = repr(error)[:300]
    finally:
        layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        for layer, setting in zip(layers, default):
            layer.fuse_rotary_store = setting
    return result


def time_rotary_store(attn, batch, dtype: torch.dtype, timer: Callable = graph_replay_ms) -> dict:
    """CALLS_PER_GRAPH calls of the rotary + KV store, fused vs two kernels; us per call."""
    from fitserve.kernels import triton_attention, triton_fused

    rope = attn.rotary
    num_tokens, head_dim = batch.num_tokens, attn.head_dim
    sizes = (attn.num_heads * head_dim, attn.num_kv_heads * head_dim, attn.num_kv_heads * head_dim)
    qkv = torch.randn(num_tokens, sum(sizes), device=batch.positions.device).to(dtype)
    q, k, v = qkv.split(sizes, dim=-1)
    kv_shape = (num_tokens, attn.num_kv_heads, head_dim)

    def fused() -> None:
        for _ in range(CALLS_PER_GRAPH):
            triton_attention.rotary_store_kv(q, k, v, attn.k_cache, attn.v_cache, batch.slot_mapping, batch.positions,
                                             rope.cos, rope.sin, attn.k_scale, attn.v_scale)

    def two_kernels() -> None:
        for _ in range(CALLS_PER_GRAPH):
            triton_fused.rotary_(q, k, batch.positions, rope.cos, rope.sin, head_dim)
            triton_attention.store_kv(k.view(kv_shape), v.view(kv_shape), attn.k_cache, attn.v_cache,
                                      batch.slot_mapping, attn.k_scale, attn.v_scale)

    return {"fused_us": 1000 * timer(fused) / CALLS_PER_GRAPH,
            "rotary_then_store_us": 1000 * timer(two_kernels) / CALLS_PER_GRAPH}


def time_decode_attention(attn, batch, dtype: torch.dtype, num_sms: int, timer: Callable = graph_replay_ms) -> dict:
    """CALLS_PER_GRAPH split-context decode attentions (split + merge kernels); us per call."""
    from fitserve.kernels import triton_decode

    num_splits = triton_decode.decode_num_splits(batch.num_seqs, attn.num_kv_heads, num_sms)
    q = torch.randn(batch.num_tokens, attn.num_heads, attn.head_dim, device=batch.positions.device).to(dtype)
    out = torch.empty_like(q)

    def calls() -> None:
        for _ in range(CALLS_PER_GRAPH):
            triton_decode.paged_decode_attention(
                q, attn.k_cache, attn.v_cache, out, batch.query_start_loc, batch.seq_lens, batch.block_tables,
                attn.scale, num_splits, attn.k_scale, attn.v_scale)

    return {"num_splits": num_splits, "split_then_merge_us": 1000 * timer(calls) / CALLS_PER_GRAPH}


def fusion_report(model, block_size: int, num_blocks: int, num_sms: int, timer: Callable = graph_replay_ms,
                  counter: Callable = gpu_kernels_per_call) -> dict:
    """Every measurement, per batch size: {"batch1": {...}, "batch20": {...}}."""
    device = next(model.parameters()).device
    attn = model.layers[0].self_attn.attn
    result = {}
    for batch_size in BATCH_SIZES:
        batch = decode_batch(batch_size, block_size, num_blocks, device)
        with torch.inference_mode():
            result[f"batch{batch_size}"] = {
                "forward": time_forward(model, batch, timer, counter),
                "rotary_store": time_rotary_store(attn, batch, model.dtype, timer),
                "decode_attention": time_decode_attention(attn, batch, model.dtype, num_sms, timer),
            }
    return result
