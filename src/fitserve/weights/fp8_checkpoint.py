"""Checkpoints that are already fp8: what config.json's `quantization_config` says (torch-free).

Two formats write e4m3 Llama checkpoints that vLLM serves, and fitserve reads both:

- `"quant_method": "fp8"` (vLLM's and AutoFP8's format): each linear layer's `weight` in
  float8_e4m3fn with a per-tensor `weight_scale`; `"activation_scheme": "static"` adds a
  per-tensor `input_scale`, "dynamic" leaves activations to run time.
- `"quant_method": "compressed-tensors"` (llm-compressor's `float-quantized` format): the same
  tensor names; `weights.strategy` "channel" (weight_scale [N, 1]) or "tensor", and
  `input_activations` either dynamic per token, static per tensor (input_scale) or absent
  (weights only).

Either may carry per-layer KV-cache scales (`self_attn.k_scale` / `v_scale`, or the older
`k_proj.output_scale` / `v_proj.output_scale`), which an fp8 KV cache then uses.

The checkpoint decides the default `--quantization` (vLLM reads it from the config too):
static input scales serve as `fp8_per_tensor` with those scales, everything else as `fp8`
(per-channel weight scales, per-token dynamic activations). Block-wise scales (128 x 128, as
DeepSeek's), integer formats and other quantization methods are refused with a clear error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from fitserve.config import ConfigError, EngineConfig

logger = logging.getLogger(__name__)

FP8_BITS = 8
# Layers a checkpoint may leave unquantized without changing what fitserve runs: they stay in
# --dtype anyway (layers/formats/fp8.py quantizes only the four linear layers of each block).
UNQUANTIZED_LAYERS = ("lm_head", "embed_tokens", "norm")


@dataclass(frozen=True, slots=True)
class CheckpointFp8:
    """An e4m3 checkpoint's scheme, as its config.json states it."""

    method: str  # "fp8" or "compressed-tensors"
    weight_scales: str  # "tensor" (one per checkpoint tensor) or "channel" (one per output row)
    activations: str  # "dynamic" (scales at run time), "static" (input_scale tensors) or "none" (weights only)
    kv_cache_scales: bool  # the config announces k_scale / v_scale tensors
    ignored: tuple[str, ...] = ()  # module names or "re:" patterns left unquantized

    @property
    def serving_quantization(self) -> str:
        """The --quantization that runs the checkpoint as it was quantized."""
        return "fp8_per_tensor" if self.activations == "static" else "fp8"

    def describe(self) -> str:
        acts = {"dynamic": "dynamic activation scales", "static": "static input scales",
                "none": "no activation scales (weights only)"}[self.activations]
        return f"{self.method} checkpoint: e4m3 weights, per-{self.weight_scales} scales, {acts}"


def parse_quantization_config(config: dict[str, Any]) -> CheckpointFp8 | None:
    """config.json's quantization_config -> its fp8 scheme; None for an unquantized checkpoint."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"config.json's quantization_config must be an object, got {type(qc).__name__}.")
    method = qc.get("quant_method")
    if method == "fp8":
        return _parse_vllm_fp8(qc)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(qc)
    raise ConfigError(
        f"This checkpoint is quantized with {method!r}; fitserve reads fp8 checkpoints (quant_method 'fp8' or "
        "'compressed-tensors' float-quantized), 4- and 8-bit integer ones ('gptq', 'awq', 'compressed-tensors' "
        "pack-quantized: docs/quantization.md) and quantizes bf16/fp16 checkpoints itself with "
        "--quantization fp8. Use the unquantized checkpoint.")


def _parse_vllm_fp8(qc: dict[str, Any]) -> CheckpointFp8:
    if qc.get("weight_block_size"):
        raise ConfigError(
            f"This fp8 checkpoint has block-wise weight scales (weight_block_size {qc['weight_block_size']}), "
            "which fitserve does not run: it reads per-tensor and per-channel fp8 checkpoints. Use the bf16 "
            "checkpoint with --quantization fp8.")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("static", "dynamic"):
        raise ConfigError(f"fp8 checkpoint: activation_scheme must be static or dynamic, got {scheme!r}.")
    ignored = qc.get("ignored_layers") or qc.get("modules_to_not_convert") or []
    return CheckpointFp8("fp8", "tensor", scheme, kv_cache_scales=bool(qc.get("kv_cache_scheme")),
                         ignored=tuple(ignored))


def _parse_compressed_tensors(qc: dict[str, Any]) -> CheckpointFp8:
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ConfigError(
            f"compressed-tensors checkpoint in state {status!r}: its weights are not stored in fp8 (only "
            "'compressed' checkpoints are). Save it compressed, or serve it as bf16 with --quantization fp8.")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ConfigError(
            f"compressed-tensors checkpoint with {len(groups)} config groups: fitserve reads one fp8 scheme for "
            "every linear layer. Use the bf16 checkpoint with --quantization fp8.")
    group = groups[0]
    weights = group.get("weights") or {}
    if not _is_fp8(weights):
        raise ConfigError(
            f"compressed-tensors checkpoint whose weights are {weights.get('type')!r} with "
            f"{weights.get('num_bits')} bits: fitserve reads only 8-bit float (e4m3) weights. Use the bf16 "
            "checkpoint, with --quantization fp8 if you want fp8.")
    if weights.get("strategy") not in ("channel", "tensor") or not weights.get("symmetric", True):
        raise ConfigError(
            f"compressed-tensors fp8 checkpoint with {weights.get('strategy')!r} weight scales: fitserve reads "
            "symmetric per-tensor or per-channel scales. Use the bf16 checkpoint with --quantization fp8.")
    acts = group.get("input_activations")
    if acts is None:
        activations = "none"
    elif not _is_fp8(acts):
        raise ConfigError(f"compressed-tensors checkpoint with {acts.get('num_bits')}-bit {acts.get('type')!r} "
                          "activations: fitserve quantizes activations to e4m3 only.")
    elif acts.get("dynamic"):
        if acts.get("strategy") not in ("token", "tensor"):
            raise ConfigError(f"compressed-tensors checkpoint with {acts.get('strategy')!r} activation scales: "
                              "fitserve runs dynamic scales per token.")
        activations = "dynamic"
    else:
        if acts.get("strategy") != "tensor":
            raise ConfigError(f"compressed-tensors checkpoint with static {acts.get('strategy')!r} activation "
                              "scales: fitserve reads static scales per tensor.")
        activations = "static"
    return CheckpointFp8("compressed-tensors", weights["strategy"], activations,
                         kv_cache_scales=bool(qc.get("kv_cache_scheme")), ignored=tuple(qc.get("ignore") or ()))


def _is_fp8(args: dict[str, Any]) -> bool:
    return args.get("type") == "float" and args.get("num_bits") == FP8_BITS


def resolve_quantization(requested: str | None, checkpoint: CheckpointFp8 | None) -> str | None:
    """The --quantization to run: the flag for a bf16/fp16 checkpoint; for an fp8 one, its own
    scheme unless the flag picks another that its scales allow."""
    if checkpoint is None:
        return requested
    if requested is None or requested == checkpoint.serving_quantization:
        return checkpoint.serving_quantization
    if requested == "fp8":  # any fp8 checkpoint: per-tensor weight scales repeat per row, input scales go unused
        return "fp8"
    if requested == "fp8_per_tensor" and checkpoint.weight_scales == "tensor":
        return "fp8_per_tensor"  # a dynamic checkpoint: input scales are calibrated at start-up
    raise ConfigError(
        f"--quantization {requested} cannot run this {checkpoint.describe()}: its weights have one scale per "
        f"output channel. Leave --quantization out (it then runs as {checkpoint.serving_quantization}) or "
        "pass --quantization fp8.")


def unquantized_block_layers(checkpoint: CheckpointFp8) -> list[str]:
    """The checkpoint's ignore entries that name something inside a block's linear layers
    (anything but lm_head, embeddings and norms): fitserve quantizes those online instead."""
    return [name for name in checkpoint.ignored if not any(part in name for part in UNQUANTIZED_LAYERS)]


def with_checkpoint_quantization(config: EngineConfig, checkpoint: CheckpointFp8 | None) -> EngineConfig:
    """The config to run an fp8 checkpoint with: --quantization its own scheme unless the flag picks
    another it allows (resolve_quantization); logs the choice and what the checkpoint leaves unused."""
    if checkpoint is None:
        return config
    quantization = resolve_quantization(config.quantization, checkpoint)
    logger.info("%s: serving it as --quantization %s", checkpoint.describe(), quantization)
    if checkpoint.activations == "none":
        logger.warning("The checkpoint quantizes weights only; fitserve's fp8 layers also quantize activations "
                       "(per token, at run time).")
    if checkpoint.kv_cache_scales and config.cache.kv_cache_dtype == "auto":
        logger.info("The checkpoint carries calibrated KV-cache scales; --kv-cache-dtype fp8 would use them.")
    unquantized = unquantized_block_layers(checkpoint)
    if unquantized:
        logger.warning("The checkpoint leaves %s unquantized; fitserve quantizes them to fp8 while loading.",
                       ", ".join(unquantized[:4]) + (" ..." if len(unquantized) > 4 else ""))
    return replace(config, quantization=quantization)
