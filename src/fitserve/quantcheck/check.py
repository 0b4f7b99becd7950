"""Run the built-in prompts through the reference setting (--dtype weights and KV cache) and a
quantized one, and compare next-token distributions.

The reference runs first, alone: greedy continuations of every prompt, then one
teacher-forced forward over prompt + continuation whose log-probabilities are kept on the
host. Its model is freed before the quantized one loads, so the check never holds two models
(it runs at start-up on the card that will serve). The quantized model then runs the same
teacher-forced forward (every position's next-token distribution, compared with the
reference's: top-1 agreement and KL divergence) and its own greedy continuations (shown side
by side). Prefill and decode both go through the paged KV cache, so an fp8 cache is measured
too.

A packed checkpoint (an integer GPTQ/AWQ/compressed-tensors one, or a .gguf file under
--quantization gguf) has no --dtype original of its own: its reference is the same checkpoint with
every packed layer replaced by its weights dequantized to --dtype (the format's own specification),
so the check measures the packed kernels. Given an original (--reference-model), that comparison
becomes the report's `kernel_check` and the main one is against the original: the kernels' error
and the quantization's, apart.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, replace

import torch

from fitserve.config import ConfigError, EngineConfig
from fitserve.core.interfaces import KVCapacity
from fitserve.core.outputs import ScheduledRequest
from fitserve.engine.tokenizer import Tokenizer
from fitserve.layers.formats.gguf import GgufLinear
from fitserve.layers.formats.int_quant import IntQuantLinear
from fitserve.startup import TORCH_DTYPES, fp8_calibration_ids, resolve_device
from fitserve.models.loader import load_model
from fitserve.plan.shapes import resolve_dtype
from fitserve.quantcheck.prompts import PROMPTS
from fitserve.quantcheck.report import AGREEMENT_TARGET, NoiseFloor, PromptComparison, QuantReport
from fitserve.runner.calibration import calibrate_fp8_activation_scales
from fitserve.runner.input_batch import build_forward_batch
from fitserve.runner.memory import TORCH_KV_DTYPES
from fitserve.runner.model_runner import allocate_kv_cache
from fitserve.sampling_params import SamplingParams
from fitserve.weights.source import ModelSource, resolve_model_source

logger = logging.getLogger(__name__)
BLOCK_SIZE = 16
DEFAULT_MAX_NEW_TOKENS = 32
_GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True, slots=True)
class Setting:
    quantization: str | None  # None, "fp8", "fp8_per_tensor", "gguf", or an integer checkpoint's method
    kv_cache_dtype: str  # "auto" (= dtype) or an fp8 name
    dequantized: bool = False  # packed layers replaced by their weights dequantized to dtype (a reference)

    def describe(self, dtype: str) -> str:
        kv = dtype if self.kv_cache_dtype == "auto" else "fp8 (e4m3)"
        weights = f"{self.quantization} dequantized to {dtype}" if self.dequantized else self.quantization or dtype
        return f"weights {weights}, KV cache {kv}"


@dataclass(slots=True)
class Reference:
    prompt_ids: list[list[int]]
    continuations: list[list[int]]  # greedy tokens, cut after the first EOS
    log_probs: list[torch.Tensor]  # per prompt [prompt + continuation, vocab] float32, on the host


class _Driver:
    """Feeds chunks of several sequences as one flat batch through a paged cache of its own."""

    def __init__(self, model: torch.nn.Module, kv_dtype: torch.dtype, max_lengths: list[int],
                 device: torch.device) -> None:
        self.model, self.device = model, device
        self.tables: list[tuple[int, ...]] = []
        next_block = 0
        for length in max_lengths:
            num_blocks = -(-length // BLOCK_SIZE)
            self.tables.append(tuple(range(next_block, next_block + num_blocks)))
            next_block += num_blocks
        self.caches = allocate_kv_cache(model.arch, KVCapacity(next_block, BLOCK_SIZE), kv_dtype, device)
        model.bind_kv_cache(self.caches)

    def forward(self, chunks: list[tuple[int, int, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence, start position, tokens) per chunk -> (hidden [T, H], last row of each chunk [S])."""
        scheduled = tuple(ScheduledRequest(str(seq), tuple(tokens), start, self.tables[seq], True, _GREEDY)
                          for seq, start, tokens in chunks)
        batch = build_forward_batch(scheduled, BLOCK_SIZE, self.device)
        return self.model(batch), batch.logits_indices

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        hidden, last = self.forward([(i, 0, p) for i, p in enumerate(prompts)])
        outs = [[t] for t in self.model.compute_logits(hidden[last]).argmax(-1).tolist()]
        for step in range(1, max_new_tokens):
            hidden, last = self.forward([(i, len(p) + step - 1, [outs[i][-1]]) for i, p in enumerate(prompts)])
            for out, token in zip(outs, self.model.compute_logits(hidden[last]).argmax(-1).tolist()):
                out.append(token)
        return outs

    def log_probs(self, sequences: list[list[int]]):
        """Teacher-forced: per sequence, log-probabilities of the next token at every position [L, vocab]."""
        hidden, _ = self.forward([(i, 0, s) for i, s in enumerate(sequences)])
        start = 0
        for seq in sequences:
            logits = self.model.compute_logits(hidden[start:start + len(seq)])  # [L, vocab] float32
            yield torch.log_softmax(logits, dim=-1)
            start += len(seq)


def _cut_after_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:index + 1]
    return tokens


def _encode(tokenizer: Tokenizer, prompt: str) -> list[int]:
    if tokenizer.hf.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt)


def _load(source: ModelSource, dtype: torch.dtype, device: torch.device, setting: Setting,
          calibration_ids: list[list[int]] | None = None):
    model = load_model(source, dtype, device, progress=False, quantization=setting.quantization)
    if setting.dequantized:
        dequantize_packed_layers(model)
    if calibration_ids is not None:  # fp8_per_tensor: as the server does at start-up (startup.build_runner)
        calibrate_fp8_activation_scales(model, calibration_ids, device)
    kv_dtype = dtype if setting.kv_cache_dtype == "auto" else TORCH_KV_DTYPES["fp8"]
    return model, kv_dtype


def dequantize_packed_layers(model: torch.nn.Module) -> int:
    """Replace every packed layer (integer, GGUF) by an unquantized one holding its dequantized weights;
    returns how many were replaced."""
    packed = [(name, m) for name, m in model.named_modules() if isinstance(m, (IntQuantLinear, GgufLinear))]
    for name, module in packed:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.dequantized())
    return len(packed)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.inference_mode()
def run_reference(source: ModelSource, dtype: torch.dtype, device: torch.device, prompt_ids: list[list[int]],
                  eos_ids: set[int], max_new_tokens: int, setting: Setting = Setting(None, "auto")) -> Reference:
    model, kv_dtype = _load(source, dtype, device, setting)
    driver = _Driver(model, kv_dtype, [len(p) + max_new_tokens for p in prompt_ids], device)
    continuations = [_cut_after_eos(c, eos_ids) for c in driver.greedy(prompt_ids, max_new_tokens)]
    sequences = [p + c for p, c in zip(prompt_ids, continuations)]
    log_probs = [lp.cpu() for lp in driver.log_probs(sequences)]
    del driver, model
    _free(device)
    return Reference(prompt_ids, continuations, log_probs)


@torch.inference_mode()
def compare(reference: Reference, source: ModelSource, dtype: torch.dtype, device: torch.device,
            setting: Setting, max_new_tokens: int, calibration_ids: list[list[int]] | None = None,
            ) -> list[tuple[list[int], int, int, int, int, float]]:
    """Per prompt: (quantized continuation, positions, agree, generated positions, generated agree, KL sum)."""
    model, kv_dtype = _load(source, dtype, device, setting, calibration_ids)
    driver = _Driver(model, kv_dtype, [len(p) + max_new_tokens for p in reference.prompt_ids], device)
    sequences = [p + c for p, c in zip(reference.prompt_ids, reference.continuations)]
    rows = []
    for prompt, ref_lp, quant_lp in zip(reference.prompt_ids, reference.log_probs, driver.log_probs(sequences)):
        ref_lp = ref_lp.to(quant_lp.device)
        agree = ref_lp.argmax(-1) == quant_lp.argmax(-1)  # [L] bool
        kl = (ref_lp.exp() * (ref_lp - quant_lp)).sum(-1)  # [L] nats
        generated = agree[len(prompt) - 1:-1]  # the positions that predicted the continuation
        rows.append([int(agree.numel()), int(agree.sum()), int(generated.numel()), int(generated.sum()),
                     float(kl.sum())])
    greedy = driver.greedy(reference.prompt_ids, max_new_tokens)
    del driver, model
    _free(device)
    return [(g, *r) for g, r in zip(greedy, rows)]


def _first_divergence(reference: list[int], quantized: list[int]) -> int | None:
    for index, token in enumerate(reference):
        if index >= len(quantized) or quantized[index] != token:
            return index
    return None


def reference_source(config: EngineConfig, source: ModelSource, reference_model: str | None) -> ModelSource:
    """The unquantized model to compare with: --reference-model, else --model itself (which an fp8
    checkpoint cannot be: it has no unquantized weights)."""
    if reference_model is None:
        if source.checkpoint_fp8 is not None:
            raise ConfigError(
                f"{source.name} is an {source.checkpoint_fp8.describe()}: it has no {config.dtype} weights to "
                "compare with. Give the bf16/fp16 checkpoint it was made from as --reference-model.")
        return source
    reference = resolve_model_source(replace(config, model=reference_model, load_format="auto"))
    if reference.checkpoint_fp8 is not None:
        raise ConfigError(f"--reference-model {reference_model} is itself an fp8 checkpoint; give an unquantized one.")
    shape_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim")
    differ = [f for f in shape_fields if getattr(reference.arch, f) != getattr(source.arch, f)]
    if differ:
        raise ConfigError(f"--reference-model {reference_model} is not the same model as {source.name}: "
                          f"{', '.join(differ)} differ.")
    return reference


def run_check(config: EngineConfig, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
              prompts: tuple[str, ...] = PROMPTS, reference_model: str | None = None,
              source: ModelSource | None = None, noise_floor: bool = False) -> QuantReport:
    """The check for config's --quantization / --kv-cache-dtype (or an fp8 or packed checkpoint's own
    scheme) against --dtype, on --model, on `reference_model`'s unquantized weights, or for a packed
    checkpoint without one on its own dequantized weights. `source`: --model's, when the caller has
    resolved it already. `noise_floor`: also compare the reference model run in float32 (a third
    load, twice the reference's weight memory)."""
    start_s = time.monotonic()
    source = source or resolve_model_source(config)
    ref_source = reference_source(config, source, reference_model)
    quantization = source.quantization(config.quantization)
    packed = quantization if quantization == "gguf" else (
        source.checkpoint_int.method if source.checkpoint_int is not None else None)
    device = resolve_device(config)
    dtype_name = resolve_dtype(config.dtype)
    dtype = TORCH_DTYPES[dtype_name]
    if noise_floor and dtype == torch.float32:
        raise ConfigError("--noise-floor compares the model in float32 with --dtype; with --dtype float32 there is "
                          "nothing to compare: use --dtype bfloat16 or float16.")
    tokenizer = Tokenizer.from_source(source)
    eos_ids = set(source.eos_token_ids or tokenizer.eos_token_ids)
    prompt_ids = [_encode(tokenizer, p) for p in prompts]
    setting = Setting(packed or quantization, config.cache.kv_cache_dtype)
    # a packed checkpoint's own dequantized weights, when no original is given
    ref_setting = Setting(packed, "auto", dequantized=True) if packed and ref_source is source else Setting(None, "auto")
    reference = run_reference(ref_source, dtype, device, prompt_ids, eos_ids, max_new_tokens, ref_setting)
    compared = compare(reference, source, dtype, device, setting, max_new_tokens,
                       fp8_calibration_ids(quantization, tokenizer, source))
    comparisons = []
    for text, ref_tokens, (quant_tokens, positions, agree, gen_positions, gen_agree, kl_sum) in zip(
            prompts, reference.continuations, compared):
        quant_tokens = _cut_after_eos(quant_tokens, eos_ids)
        comparisons.append(PromptComparison(
            prompt=text, reference_text=tokenizer.decode(ref_tokens), quantized_text=tokenizer.decode(quant_tokens),
            num_positions=positions, num_agree=agree, num_generated_positions=gen_positions,
            num_generated_agree=gen_agree, kl_sum=kl_sum, first_divergence=_first_divergence(ref_tokens, quant_tokens),
        ))
    floor = _noise_floor(reference, ref_source, ref_setting, device, max_new_tokens) if noise_floor else None
    kernel_check = None
    if packed and ref_source is not source:  # the kernels against the same weights dequantized, too
        own = Setting(packed, config.cache.kv_cache_dtype, dequantized=True)
        own_reference = run_reference(source, dtype, device, prompt_ids, eos_ids, max_new_tokens, own)
        kernel_check = _totals(own.describe(dtype_name), compare(own_reference, source, dtype, device, setting,
                                                                 max_new_tokens))
    described_ref = ref_setting.describe(dtype_name)
    described = setting.describe(dtype_name)
    if ref_source is not source:
        described_ref, described = f"{described_ref} ({ref_source.name})", f"{described} ({source.name})"
    return QuantReport(
        model=source.name, device=str(device), reference=described_ref,
        quantized=described, max_new_tokens=max_new_tokens, prompts=tuple(comparisons),
        seconds=time.monotonic() - start_s, noise_floor=floor, kernel_check=kernel_check,
    )


def _totals(setting: str, rows: list[tuple[list[int], int, int, int, int, float]]) -> NoiseFloor:
    """compare()'s rows summed over the prompts: positions, agree, generated ones, KL sum."""
    return NoiseFloor(setting, *[sum(column) for column in list(zip(*rows))[1:]])


def _noise_floor(reference: Reference, source: ModelSource, ref_setting: Setting, device: torch.device,
                 max_new_tokens: int) -> NoiseFloor:
    """The reference model in float32 (weights and KV cache) through compare(), summed over the prompts."""
    setting = replace(ref_setting, kv_cache_dtype="auto")
    return _totals(setting.describe("float32"), compare(reference, source, torch.float32, device, setting,
                                                        max_new_tokens))


def verify_at_startup(config: EngineConfig) -> QuantReport | None:
    """`serve --verify-quantization`: run the check before the engine loads and log its figures."""
    source = resolve_model_source(config)
    checkpoint = source.checkpoint_fp8
    if checkpoint is not None:
        logger.warning("--verify-quantization: the model is an %s, with no unquantized weights to compare with; "
                       "run `fitserve check-quant --model M --reference-model ORIGINAL`.", checkpoint.describe())
        return None
    if config.quantization is None and config.cache.kv_cache_dtype == "auto" and source.checkpoint_int is None:
        logger.info("--verify-quantization: nothing is quantized (no --quantization, --kv-cache-dtype auto)")
        return None
    logger.info("--verify-quantization: comparing with --dtype on %d built-in prompts", len(PROMPTS))
    report = run_check(config, source=source)
    log = logger.info if report.top1_agreement >= AGREEMENT_TARGET else logger.warning
    log("Quantization check: %s (%.1f s)", report.summary(), report.seconds)
    return report
