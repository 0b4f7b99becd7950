"""load_model: build the model on its device and fill it from GGUF, safetensors, or random values.

The architecture comes from models/registry.py (an unknown one fails here, before any weight is
read), the linear layers' weight format from `quantization` (layers/formats/registry.py): with
fp8 each checkpoint tensor is quantized as it arrives, so the serving-dtype copy of the model
never exists; with gguf a GGUF file's block projections arrive packed (weights/gguf_packed.py)
and stay so.
With tensor parallelism (`tp`) each rank keeps its slice of the split tensors: a safetensors
checkpoint is read only as that slice; a GGUF file is dequantized tensor by tensor and sliced
(its quantization blocks run along the rows); dummy weights are drawn whole and sliced.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from fitserve.config import ConfigError
from fitserve.kernels import gguf as gguf_blocks
from fitserve.layers.formats.fp8 import Fp8Linear
from fitserve.layers.parallel import SINGLE, TensorParallel
from fitserve.layers.formats.int_quant import IntQuantFormat
from fitserve.layers.weight_format import LinearLayer, WeightFormat
from fitserve.models.base import CausalLM
from fitserve.models.registry import get_model_class
from fitserve.weights import dummy_quant
from fitserve.weights.dummy_quant import DUMMY_INIT_STD, DUMMY_SEED  # noqa: F401 (benchmarks use them)
from fitserve.weights.gguf_packed import PackedGgufTensor, gguf_packed_weights
from fitserve.weights.loader import gguf_weights, safetensors_weights
from fitserve.weights.source import ModelSource


def dequantize_gguf_blocks(data: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray | None:
    """A block-quantized GGUF tensor's values in float32 [out, in] by kernels/gguf.py (torch, all blocks
    at once; gguf's numpy dequantization bit for bit, 1.6 s -> 0.4 s for the embedded model's tensors);
    None for the types it does not hold (F32, F16, BF16, ...), which gguf's own code reads."""
    block = gguf_blocks.BLOCK_TYPES.get(ggml_type)
    if block is None or len(shape) != 2:
        return None
    packed = torch.from_numpy(np.array(data, copy=True)).view(torch.uint8)  # a writable copy of the memmap
    return gguf_blocks.dequantize(packed.reshape(shape[0], block.row_bytes(shape[1])), ggml_type).numpy()


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, progress: bool = True,
               quantization: str | None = None, tp: TensorParallel = SINGLE,
               fuse_rotary_store: bool = True) -> CausalLM:
    model_class = get_model_class(source.arch.architecture)
    packed_weights = None
    if quantization == "gguf" and source.dummy_layout != "gguf":
        if source.kind != "gguf":
            raise ConfigError(
                f"--quantization gguf keeps a .gguf file's blocks packed; {source.name!r} is {source.kind}.")
        packed_weights = gguf_packed_weights(source)  # ConfigError for a type it cannot keep packed
    model = model_class(source.arch, dtype, device, quantization=linear_format(source, quantization, tp), tp=tp,
                        fuse_rotary_store=fuse_rotary_store)
    if source.kind == "dummy":
        weights = dummy_weights(model, source)
    elif packed_weights is not None:
        weights = packed_weights
    elif source.kind == "gguf":
        weights = gguf_weights(source, dequantize_gguf_blocks)
    else:
        weights = safetensors_weights(source.weights_path, model.checkpoint_slice)
    prequantized = source.kind == "hf" and source.checkpoint_fp8 is not None
    bar = tqdm(weights, total=None if prequantized else len(model.expected_weight_names()),  # + scale tensors
               desc=f"Loading {source.name}", unit="tensor", disable=not progress or source.kind == "dummy")
    try:
        loaded = model.load_weights(bar)
    except ValueError as exc:  # a tensor of the wrong shape, dtype or name: the checkpoint's fault
        raise ConfigError(f"Cannot load {source.weights_path}: {exc}") from None
    missing = model.expected_weight_names() - loaded
    if missing:
        raise ConfigError(f"The checkpoint {source.weights_path} lacks {len(missing)} tensors, "
                          f"e.g. {sorted(missing)[:3]}.")
    finish_linear_layers(model, source, quantization)
    if model.device.type == "cuda":
        torch.cuda.empty_cache()  # hand back the temporaries (whole dummy tensors, fp8) before memory is measured
    return model.eval()


def linear_format(source: ModelSource, quantization: str | None, tp: TensorParallel) -> str | WeightFormat | None:
    """The linear layers' format: `quantization`, or an integer checkpoint's own (GPTQ, AWQ,
    compressed-tensors), which it must be served in."""
    scheme = source.checkpoint_int
    if scheme is None:
        return quantization
    if quantization not in (None, scheme.method):
        raise ConfigError(f"{source.name} is a {scheme.describe()}; it is served as stored: leave --quantization "
                          f"out or pass --quantization {scheme.method} (got {quantization}).")
    if tp.size > 1:
        raise ConfigError(f"{source.name} is a {scheme.describe()}: tensor parallelism is not supported for "
                          "integer checkpoints yet.")
    return IntQuantFormat(scheme)


def finish_linear_layers(model: CausalLM, source: ModelSource, quantization: str | None) -> None:
    """Every linear layer is whole (its weight format checks); an fp8 checkpoint with static input
    scales gave one to each (fp8_per_tensor then needs no calibration: startup.fp8_calibration_ids)."""
    for name, module in model.named_modules():
        if isinstance(module, LinearLayer):
            try:
                module.finish_loading()
            except ValueError as exc:
                raise ConfigError(f"The checkpoint {source.weights_path}: {name}: {exc}.") from None
    if checkpoint_input_scales(source, quantization):
        lacking = [n for n, m in model.named_modules() if isinstance(m, Fp8Linear) and m.input_scale is None]
        if lacking:
            raise ConfigError(f"The checkpoint {source.weights_path} declares static input scales, but "
                              f"{len(lacking)} layers have none, e.g. {lacking[0]}.")


def checkpoint_input_scales(source: ModelSource, quantization: str | None) -> bool:
    """Whether fp8_per_tensor's static input scales come from the checkpoint (else start-up calibrates)."""
    checkpoint = source.checkpoint_fp8
    return (quantization == "fp8_per_tensor" and source.kind == "hf" and checkpoint is not None
            and checkpoint.activations == "static")


def dummy_weights(model: CausalLM, source: ModelSource | None = None,
                  ) -> Iterator[tuple[str, torch.Tensor | PackedGgufTensor]]:
    """Random HF-named tensors on the model's device (weights/dummy_quant.py): in the serving dtype,
    norms at one, or, for a source with a `dummy_layout`, its block projections in that packed layout.

    Each tensor is drawn whole from its own generator, seeded by its name, so the values do
    not depend on the order of loading or on the tensor-parallel size: a rank's slice of a
    TP=2 model is the same slice of the TP=1 model. An fp8 layer quantizes the same values.
    """
    shapes = model.checkpoint_tensor_shapes()
    if source is None or source.dummy_layout is None:
        return dummy_quant.dense_weights(shapes, model.dtype, model.device)
    return dummy_quant.packed_weights(shapes, source.arch, source.dummy_layout, source.checkpoint_int, model.dtype,
                                      model.device)


@torch.no_grad()
def init_dummy(model: CausalLM) -> None:
    """Fill a built model with dummy_weights (tests build models directly)."""
    model.load_weights(dummy_weights(model))
