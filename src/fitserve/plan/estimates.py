"""Memory that is not weights or KV cache, estimated before anything runs (torch-free).

At start-up on a GPU, the activation peak and the runtime memory outside torch are measured
(runner/profiling.py) and replace these estimates; the CUDA-graph pool is captured after the
KV cache is allocated, so its estimate is what start-up reserves for it. Each constant below
says where its figure comes from: the CPU-measurable ones are checked by
tests/test_plan_estimates.py, the others were read on an H200 (torch 2.11, CUDA 13, driver
580) by benchmarks/startup_memory.py (benchmarks/results/startup_memory_h200.json).
"""

from __future__ import annotations

from fitserve.arch_config import ArchConfig
from fitserve.plan.shapes import block_projections

MIB = 1 << 20

# The CUDA context and driver state a process holds once it touches the GPU, before it
# allocates anything: outside the budget, like vLLM (it is why 1.00 cannot work). H200: 619 MiB.
CUDA_CONTEXT_BYTES = 640 * MIB
# Memory outside torch's allocator that loading and the first forward add inside the budget:
# kernel images of cuBLAS/Triton loaded on first use, library handles. H200: 68 MiB.
RUNTIME_NON_TORCH_BYTES = 80 * MIB
# From this many rows, integer group-quantized weights (GPTQ, AWQ, compressed-tensors) are multiplied by
# dequantizing each weight into one scratch of the serving dtype and calling cuBLAS
# (kernels/triton_int_quant.py dequant_mm; DEFAULT_TABLE takes this value): the scratch, the largest
# projection's elements in the serving dtype, is then part of the activation peak of a token budget this
# large. Timed on an H100 (benchmarks/int_quant_bench.py, docs/quantization.md): at 256 rows a Llama-3-8B
# step's layers take 14.0 ms this way against the words tile's 15.3 (bf16 6.7); at 128, 13.0 against the
# 128-row split-K tile's 8.2. None turns it off.
DEQUANT_MATMUL_MIN_ROWS: int | None = 256
# The same for GGUF blocks kept packed (kernels/triton_gguf.py dequant_mm takes this value): from 16 rows, where
# the small tensor-core GEMM over the blocks made Llama-3-8B Q4_K_M's W1 3.5x slower than bf16 on an H100.
GGUF_DEQUANT_MIN_ROWS = 16
# cuBLAS / cuBLASLt workspaces, which torch allocates through its caching allocator. H200: 16 MiB
# above the forward's tensors.
GEMM_WORKSPACE_BYTES = 16 * MIB
# Live elements per token at the forward's peak, inside the MLP: six [T, hidden] tensors
# (layer input, residuals, norm output, attention output) plus gate_up [T, 2 x intermediate]
# and the SiLU-and-mul output [T, intermediate] of the fused GPU kernel.
MLP_PHASE_HIDDEN_TENSORS = 6
MLP_PHASE_INTERMEDIATE_TENSORS = 3
# The pure-torch path (the CPU) also holds silu(gate) [T, intermediate] apart, and its RMSNorm
# works on three [T, hidden] float32 temporaries.
REFERENCE_SILU_TEMPORARIES = 1
NORM_PHASE_FP32_HIDDEN_TENSORS = 3
FP32_BYTES = 4
# An MoE layer's routing per token choice: float32 weight, int64 expert id, int32 sorted index and
# the align step's int64 temporaries (order, rank, destination)
MOE_ROUTING_BYTES_PER_CHOICE = 4 + 8 + 4 + 3 * 8
# The sampler's memory per logit (runner/sampler.py, with every option on). Held for the whole
# batch: the float32 logits and the raw logprobs kept for the step (8). The penalties' count slab:
# int32 counts and a bool prompt mask per tracked request (5), rows doubling from 8. Per pass of
# at most SAMPLER_ROWS_PER_PASS rows: the penalties' temporaries, the temperature-scaled copy,
# sorted values (float32) and ids (int64), softmax, cumulative sum, masked copies, probabilities
# and noise (29). tests/test_plan_estimates.py measures them on the CPU.
SAMPLER_HELD_BYTES_PER_LOGIT = 8
PENALTY_SLAB_BYTES_PER_LOGIT = 5
SAMPLER_PASS_BYTES_PER_LOGIT = 29
SAMPLER_ROWS_PER_PASS = 64  # must match runner/sampler.py ROWS_PER_PASS (a test checks)
PENALTY_SLAB_FIRST_ROWS = 8  # must match runner/logits_processors.py INITIAL_SLAB_ROWS (a test checks)
# On CUDA a pass's sort needs scratch space besides its outputs: 19.2 bytes per logit of a
# 64-row pass on an H100 (benchmarks/sampler_memory.py, results/sampler_memory_h100_2491129.json:
# 48.2 bytes per logit of a pass in all, 8 held per row of the batch, as on the CPU).
CUDA_SORT_SCRATCH_BYTES_PER_LOGIT = 20
# One CUDA graph's executable lives outside torch (driver memory), per captured batch size.
# H200: the pool measured 92 to 140 MiB above its tensors for 36 graphs of Llama-3-8B.
GRAPH_DRIVER_BYTES_PER_CAPTURE = 4 * MIB
# Decode batch sizes captured as CUDA graphs; must match runner/cuda_graph.py (a test checks).
GRAPH_SMALL_BATCH_SIZES = (1, 2, 4)
GRAPH_BATCH_STEP = 8


def forward_peak_bytes(arch: ArchConfig, num_tokens: int, act_bytes: int, fp8_linear: bool = False,
                       fused_kernels: bool = True) -> int:
    """Peak activation bytes of one forward over `num_tokens` tokens (weights and KV left out);
    `fused_kernels=False` for the pure-torch reference path."""
    hidden, inter = arch.hidden_size, arch.intermediate_size
    inter_tensors = MLP_PHASE_INTERMEDIATE_TENSORS + (0 if fused_kernels else REFERENCE_SILU_TEMPORARIES)
    mlp_phase = act_bytes * (MLP_PHASE_HIDDEN_TENSORS * hidden + inter_tensors * inter)
    if fp8_linear:  # the down projection's input is quantized to one byte per element first
        mlp_phase += inter
    norm_temporaries = 0 if fused_kernels else FP32_BYTES * NORM_PHASE_FP32_HIDDEN_TENSORS * hidden
    norm_phase = act_bytes * MLP_PHASE_HIDDEN_TENSORS * hidden + norm_temporaries
    if arch.num_experts:
        mlp_phase = max(mlp_phase if arch.dense_mlp_layers else 0, moe_phase_bytes(arch, act_bytes))
    return num_tokens * max(mlp_phase, norm_phase)


def moe_phase_bytes(arch: ArchConfig, act_bytes: int) -> int:
    """Live bytes per token inside an MoE layer (kernels/triton_moe.py): the six [T, hidden] tensors,
    and for each of the k choices its gate_up [2I], SiLU output [I] and down output [H] rows, its
    routing weight and ids (the pure-torch path holds less: one expert's rows at a time)."""
    k, inter = arch.num_experts_per_tok, arch.moe_intermediate_size
    per_choice = act_bytes * (MLP_PHASE_INTERMEDIATE_TENSORS * inter + arch.hidden_size) + MOE_ROUTING_BYTES_PER_CHOICE
    return act_bytes * MLP_PHASE_HIDDEN_TENSORS * arch.hidden_size + k * per_choice


def penalty_slab_rows(num_requests: int) -> int:
    """Rows of the count slab once num_requests are tracked: doubled from PENALTY_SLAB_FIRST_ROWS."""
    rows = PENALTY_SLAB_FIRST_ROWS
    while rows < num_requests:
        rows *= 2
    return rows


def sampler_peak_bytes(arch: ArchConfig, num_rows: int, act_bytes: int, on_gpu: bool = True) -> int:
    """Logits for `num_rows` requests and the sampler's worst path (penalties, top-k/top-p/min-p,
    logprobs), pass by pass as runner/sampler.py takes the rows."""
    vocab = arch.vocab_size
    # compute_logits holds the projection in the model dtype and its float32 copy at once
    projection = num_rows * vocab * (act_bytes + FP32_BYTES)
    held = num_rows * vocab * SAMPLER_HELD_BYTES_PER_LOGIT
    per_pass_logit = SAMPLER_PASS_BYTES_PER_LOGIT + (CUDA_SORT_SCRATCH_BYTES_PER_LOGIT if on_gpu else 0)
    peak = 0
    for start in range(0, num_rows, SAMPLER_ROWS_PER_PASS):
        rows = min(SAMPLER_ROWS_PER_PASS, num_rows - start)
        slab = penalty_slab_rows(start + rows) * vocab * PENALTY_SLAB_BYTES_PER_LOGIT
        peak = max(peak, held + slab + rows * vocab * per_pass_logit)
    return max(projection, peak)


def activation_peak_bytes(
    arch: ArchConfig, max_num_batched_tokens: int, max_num_seqs: int, act_bytes: int, fp8_linear: bool = False
) -> int:
    """What the profiling run measures: a forward of the whole token budget, then logits and
    sampling for as many requests as one step can hold, plus the GEMM workspaces."""
    forward = forward_peak_bytes(arch, max_num_batched_tokens, act_bytes, fp8_linear)
    num_rows = min(max_num_seqs, max_num_batched_tokens)
    final_hidden = max_num_batched_tokens * arch.hidden_size * act_bytes  # alive while sampling
    sampling = final_hidden + sampler_peak_bytes(arch, num_rows, act_bytes)
    return max(forward, sampling) + GEMM_WORKSPACE_BYTES


def dequant_scratch_bytes(arch: ArchConfig, max_num_batched_tokens: int, act_bytes: int, gguf: bool = False) -> int:
    """Packed projections' scratch (kernels/triton_int_quant.py and triton_gguf.py dequant_mm): the largest
    block projection in the serving dtype, once a step's token budget reaches DEQUANT_MATMUL_MIN_ROWS (integer
    checkpoints) or GGUF_DEQUANT_MIN_ROWS (`gguf`: GGUF blocks)."""
    min_rows = GGUF_DEQUANT_MIN_ROWS if gguf else DEQUANT_MATMUL_MIN_ROWS
    if min_rows is None or max_num_batched_tokens < min_rows:
        return 0
    return max(rows * in_features for rows, in_features in block_projections(arch)) * act_bytes


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in GRAPH_SMALL_BATCH_SIZES if s < max_num_seqs]
    sizes += list(range(GRAPH_BATCH_STEP, max_num_seqs, GRAPH_BATCH_STEP))
    return sorted(set(sizes + [max_num_seqs]))


def cuda_graph_pool_bytes(arch: ArchConfig, max_num_seqs: int, act_bytes: int, fp8_linear: bool = False) -> int:
    """Decode graphs share one pool, captured largest first. Each keeps its output hidden
    states [size, hidden] alive (the logits are computed outside the graphs); the largest
    capture's activations are freed inside the pool and reused by the smaller ones."""
    sizes = graph_batch_sizes(max_num_seqs)
    kept_hidden = sum(sizes) * arch.hidden_size * act_bytes
    transient = forward_peak_bytes(arch, sizes[-1], act_bytes, fp8_linear)
    return kept_hidden + transient + len(sizes) * GRAPH_DRIVER_BYTES_PER_CAPTURE
