"""The physical floors benchmarks/gpu_bench.py measures against, for any model and weight format fitserve plans.

BENCHMARKS.md's roofline: a decode step of B rows reads the weights once and each row's KV, at the
card's copy bandwidth; a prompt token costs 2 x N FLOPs at its matrix rate. The figures come from
fitserve's own plan (the ParamCounts and WeightBytes start-up plans for the same EngineConfig, and its
KV bytes per token), so every architecture and weight format is counted as fitserve holds it, with no
second parameter formula here. What a step reads, in BENCHMARKS.md's terms (docs/performance.md):

- W(B) = the resident weights less what no decode step reads in full: the rotary tables (a step reads
  B rows of them) and an untied input embedding table (B rows of it); the lm_head, norms and routers are
  read whole. Packed formats (GPTQ, GGUF) count their packed bytes with scales and zeros, as planned.
- MoE (Mixtral, Qwen3-MoE): per MoE layer, the expected number of distinct experts B rows route to,
  E x (1 - (1 - k/E)^B) for E experts and top-k under uniform routing (dummy weights route about
  uniformly: random router rows give every expert the same chance), times one expert's bytes.
- KV per row at context L: each layer's K and V for min(L, window) tokens (L for a full-attention layer).
- Prefill: N = the parameters one prompt token multiplies, with k of the E experts of each MoE layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

# id: (requests, concurrency, prompt tokens, output tokens); BENCHMARKS.md
WORKLOADS = {
    "W1": (100, 20, 512, 128),
    "W2": (1000, 256, 512, 128),
    "W3": (200, 32, 3072, 64),
    "W4": (200, 64, 128, 1024),
    "W6": (100, 20, 512, 128),  # W1 on the guide's 20 GB card: an 18 GiB budget (BENCHMARKS.md)
    "single": (1, 1, 512, 256),
}
# Each workload's prompt seed: distinct, so no workload finds another's prompts in the prefix cache
# (with one seed, W2's first 100 prompts were W1's, and W2 after W1 skipped a tenth of its prefill).
WORKLOAD_SEEDS = {name: index + 1 for index, name in enumerate(WORKLOADS)}


def prompt_seed(workload: str, repeat: int = 0) -> int:
    """The seed of `workload`'s prompts in run `repeat` of it: no two (workload, repeat) share one, so
    no run finds an earlier one's prompts in the prefix cache (in-process and through HTTP alike)."""
    return 1000 * repeat + WORKLOAD_SEEDS.get(workload, 0)
FP8_QUANTIZATIONS = ("fp8", "fp8_per_tensor")
PACKED_QUANTIZATIONS = ("gptq", "awq", "gguf")  # dummy packed layouts: weights/dummy_quant.py


@dataclass(frozen=True, slots=True)
class QuantVariant:
    quantization: str | None  # --quantization
    kv_cache_dtype: str  # --kv-cache-dtype
    # fp8 weights through the weight-only W8A16 kernel (kernels/triton_w8a16.py) even on a card with fp8
    # tensor cores, as on one without them (gpu_bench.py force_fp8_weight_only)
    fp8_weight_only: bool = False

    @property
    def prefill_at_fp8_rate(self) -> bool:
        """Whether the linear layers multiply fp8 activations (W8A8), at the card's fp8 matrix rate."""
        return self.quantization in FP8_QUANTIZATIONS and not self.fp8_weight_only


# --quant-variants of gpu_bench.py. gptq_int4 and q4_k_m are dummy packed weights made from a config-only
# folder: EngineConfig(load_format="dummy", quantization="gptq" | "gguf") (GPTQ int4 group 128 symmetric;
# llama.cpp's Q4_K_M assignment of Q4_K and Q6_K).
QUANT_VARIANTS = {
    "bf16": QuantVariant(None, "auto"),
    "fp8": QuantVariant("fp8", "fp8"),
    "fp8_weights": QuantVariant("fp8", "auto"),
    "fp8_per_tensor": QuantVariant("fp8_per_tensor", "fp8"),
    "fp8_w8a16": QuantVariant("fp8", "auto", fp8_weight_only=True),
    "gptq_int4": QuantVariant("gptq", "auto"),
    "q4_k_m": QuantVariant("gguf", "auto"),
}


class FiguresUnavailable(RuntimeError):
    """The plan cannot count a variant's weights (a packed dummy layout this fitserve does not make)."""


@dataclass(frozen=True, slots=True)
class ModelFigures:
    """What one decode step and one prompt token cost a model in one weight format, from fitserve's plan."""

    model: str  # the config folder's name
    quant_variant: str
    params: int  # every parameter fitserve holds (ParamCounts.num_params)
    resident_weight_bytes: int  # the planned weights less the rotary tables
    input_embedding_bytes: int  # an untied embed_tokens table (0 when tied: it is the lm_head, read whole)
    dense_read_bytes: int  # what every decode step reads in full: all but the experts and the input table
    one_expert_bytes: int  # one expert's gate, up and down (0 for a dense model)
    num_moe_layers: int
    num_experts: int  # E
    experts_per_token: int  # k
    prefill_params: int  # N: parameters one prompt token multiplies (k experts per MoE layer)
    fp8_prefill_params: int  # those of N multiplied at the fp8 rate (W8A8 linear layers)
    kv_layer_bytes_per_token: int  # one layer's K and V for one token
    layer_windows: tuple[int | None, ...]  # each layer's sliding window; None: the whole context

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_layer_bytes_per_token * len(self.layer_windows)

    def weight_bytes_read(self, rows: int) -> float:
        """W(B): the weight bytes a decode step of `rows` rows reads."""
        experts = expected_distinct_experts(self.num_experts, self.experts_per_token, rows) if self.num_experts else 0.0
        return self.dense_read_bytes + self.num_moe_layers * experts * self.one_expert_bytes

    def kv_bytes_read(self, context_tokens: float) -> float:
        """The KV bytes one row at `context_tokens` reads: min(context, window) tokens per windowed layer."""
        tokens = sum(context_tokens if window is None else min(context_tokens, window) for window in self.layer_windows)
        return self.kv_layer_bytes_per_token * tokens

    def to_json(self) -> dict:
        return asdict(self) | {"kv_bytes_per_token": self.kv_bytes_per_token,
                               "weight_bytes_read_at_1": self.weight_bytes_read(1),
                               "weight_bytes_read_at_256": self.weight_bytes_read(256)}


def expected_distinct_experts(num_experts: int, top_k: int, rows: int) -> float:
    """Distinct experts `rows` tokens route to in one layer, each choosing top_k of num_experts uniformly:
    E x (1 - (1 - k/E)^B). One row: k; many rows: E."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** rows)


def planned_inputs(config_dir: Path, variant: QuantVariant):
    """The PlanInputs start-up makes for this model on a GPU (startup.build_engine's steps up to the plan)."""
    import torch

    from fitserve import startup
    from fitserve.config import CacheConfig, EngineConfig
    from fitserve.plan.planner import resolve_max_model_len
    from fitserve.weights.fp8_checkpoint import with_checkpoint_quantization
    from fitserve.weights.gguf_packed import with_gguf_quantization
    from fitserve.weights.source import resolve_model_source

    config = EngineConfig(model=str(config_dir), load_format="dummy", dtype="bfloat16",
                          quantization=variant.quantization, cache=CacheConfig(kv_cache_dtype=variant.kv_cache_dtype))
    source = resolve_model_source(config)
    config = with_checkpoint_quantization(config, source.checkpoint_fp8)
    config = with_gguf_quantization(config, source, on_gpu=True)
    max_model_len = resolve_max_model_len(None, source.arch)
    return startup.plan_inputs(config, source, max_model_len, torch.device("cpu"), None)


def model_figures(config_dir: Path, quant_variant: str) -> ModelFigures:
    from fitserve.plan.shapes import DTYPE_BYTES, kv_bytes_per_token, kv_dtype_name, weight_bytes

    variant = QUANT_VARIANTS[quant_variant]
    inputs = planned_inputs(config_dir, variant)
    arch, counts = inputs.arch, inputs.param_counts
    if variant.quantization in PACKED_QUANTIZATIONS and not counts.packed_linear_params:
        raise FiguresUnavailable(f"{quant_variant}: the plan holds no packed projections for a dummy "
                                 f"--quantization {variant.quantization} model (needs dummy packed weights).")
    # the protocol's floor reads a GGUF type's own bits (Q4_K 4.5), not the 4.625 of the K-quant form that a
    # 16-bit GPU layer holds (plan/gguf_bytes.py HELD_BLOCK_BYTES): the stricter floor
    weights = weight_bytes(replace(counts, packed_16bit_extra_bytes=0), inputs.dtype, inputs.quantization)
    dtype_bytes = DTYPE_BYTES[inputs.dtype]
    resident = weights.total_bytes - weights.rotary_bytes
    input_table = 0 if arch.tie_word_embeddings else weights.embedding_bytes // 2
    num_moe_layers = sum(arch.is_moe_layer(layer) for layer in range(arch.num_hidden_layers))
    all_experts_bytes = weights.expert_bytes - counts.router_params * dtype_bytes  # the routers are read whole
    num_experts, top_k = arch.num_experts, arch.num_experts_per_tok
    one_expert_params = counts.expert_params // (num_moe_layers * num_experts) if num_moe_layers else 0
    kv_dtype = kv_dtype_name(inputs.kv_cache_dtype, inputs.dtype)
    return ModelFigures(
        model=Path(config_dir).name, quant_variant=quant_variant, params=counts.num_params,
        resident_weight_bytes=resident, input_embedding_bytes=input_table,
        dense_read_bytes=resident - input_table - all_experts_bytes,
        one_expert_bytes=all_experts_bytes // (num_moe_layers * num_experts) if num_moe_layers else 0,
        num_moe_layers=num_moe_layers, num_experts=num_experts, experts_per_token=top_k,
        prefill_params=counts.num_params - num_moe_layers * (num_experts - top_k) * one_expert_params,
        fp8_prefill_params=counts.linear_params if variant.prefill_at_fp8_rate else 0,
        kv_layer_bytes_per_token=kv_bytes_per_token(arch, kv_dtype) // arch.num_hidden_layers,
        layer_windows=tuple(arch.layer_window(layer) for layer in range(arch.num_hidden_layers)),
    )


def floor_s(workload: str, ceilings: dict, model: ModelFigures) -> float:
    """BENCHMARKS.md's floor: ceil(R/C) x O decode steps, each reading W(C) + C x KV(P + O/2) at the copy
    bandwidth, plus R x P prompt tokens of 2 x N FLOPs (the fp8 layers' share at the fp8 rate)."""
    requests, concurrency, prompt, output = WORKLOADS[workload]
    steps = -(-requests // concurrency) * output
    step_bytes = model.weight_bytes_read(concurrency) + concurrency * model.kv_bytes_read(prompt + output / 2)
    decode_s = steps * step_bytes / ceilings["copy_bytes_per_s"]
    bf16_params = model.prefill_params - model.fp8_prefill_params
    fp8_rate = ceilings.get("fp8_flops_per_s", ceilings["bf16_flops_per_s"])
    prefill_s = requests * prompt * 2 * (bf16_params / ceilings["bf16_flops_per_s"]
                                         + model.fp8_prefill_params / fp8_rate)
    return decode_s + prefill_s


def token_floor_ms(ceilings: dict, model: ModelFigures, context_tokens: float) -> float:
    """Single-stream decode: (W(1) + KV(L)) / B per token at context L, in ms."""
    return 1000 * (model.weight_bytes_read(1) + model.kv_bytes_read(context_tokens)) / ceilings["copy_bytes_per_s"]


def single_stream_context(workload: str = "single") -> float:
    """The mean context of a single-stream run's decode steps: P + O/2."""
    _, _, prompt, output = WORKLOADS[workload]
    return prompt + output / 2


def floor_report(config_dir: Path, quant_variant: str, ceilings: dict) -> dict:
    """A model's figures in one variant and its floors on the measured ceilings, or why there are none."""
    from fitserve.config import ConfigError

    try:
        figures = model_figures(config_dir, quant_variant)
    except (FiguresUnavailable, ConfigError) as error:  # e.g. a packed dummy layout this fitserve lacks
        return {"error": f"{type(error).__name__}: {error}"}
    report: dict = {"model": figures.to_json()}
    if "copy_bytes_per_s" not in ceilings:  # the ceilings part failed: figures without floors
        return report
    report["floors_s"] = {workload: floor_s(workload, ceilings, figures) for workload in WORKLOADS}
    report["single_token_floor_ms"] = token_floor_ms(ceilings, figures, single_stream_context())
    return report
