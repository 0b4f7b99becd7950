"""Random weights for `--load-format dummy`: in the serving dtype, or in a packed layout
(weights/dummy_layouts.py) as its checkpoint would store them, so they take the loader's path.

Every tensor is drawn from its own generator, seeded by its name, so values do not depend on
the order of loading. Packed values are random bits, but their scales are chosen so that a
weight's root mean square is about DUMMY_INIT_STD, as the dense dummy's is: small enough that
32 random layers keep activations finite in bf16. Zeros sit in the middle of their range.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import torch
from gguf import GGMLQuantizationType

from fitserve.arch_config import ArchConfig
from fitserve.config import ConfigError
from fitserve.weights.dummy_gguf import random_blocks
from fitserve.weights.dummy_layouts import (
    BLOCK_SIZES,
    DENSE,
    DUMMY_INIT_STD,
    SCALE_SPREAD,
    BlockProjection,
    block_projections,
    q4_k_m_type,
)
from fitserve.weights.gguf_packed import PackedGgufTensor
from fitserve.weights.int_checkpoint import IntQuantScheme

DUMMY_SEED = 0
# GGML type values (as a GGUF header stores them) of the types the dummy Q4_K_M layout uses
GGML_TYPE_IDS = {name: GGMLQuantizationType[name].value for name in BLOCK_SIZES}
FUSED_PROJECTIONS = ("qkv_proj", "gate_up_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # under self_attn; the others under mlp


def generator_for(name: str, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(DUMMY_SEED + zlib.crc32(name.encode()))


def dense_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One tensor in `dtype`: a norm at one, anything else normal with DUMMY_INIT_STD."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if name.endswith("norm.weight"):
        return tensor.fill_(1.0)
    return tensor.normal_(0.0, DUMMY_INIT_STD, generator=generator_for(name, device))


def dense_weights(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape in sorted(shapes.items()):
        yield name, dense_tensor(name, shape, dtype, device)


def packed_weights(shapes: dict[str, tuple[int, ...]], arch: ArchConfig, layout: str, scheme: IntQuantScheme | None,
                   dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, torch.Tensor | PackedGgufTensor]]:
    """A checkpoint's tensors (HF names -> full shapes) with every block projection in `layout`:
    an integer scheme's pieces (`scheme`), or packed GGUF blocks of the Q4_K_M mix ("gguf").
    ConfigError here, before the first tensor, for a model not named as Llama's projections are."""
    fused = [n for n in shapes if n.rpartition(".")[0].rpartition(".")[2] in FUSED_PROJECTIONS]
    projections = {f"model.layers.{p.layer}.{'self_attn' if p.name in ATTENTION else 'mlp'}.{p.name}.weight": p
                   for p in block_projections(arch)}
    missing = sorted(set(projections) - set(shapes))
    if fused or missing:  # another naming than Llama's: its projections would be drawn dense
        raise ConfigError(f"--load-format dummy --quantization {layout}: the packed dummy layouts are made for "
                          f"Llama's separate q/k/v/o, gate/up/down projections; this model has "
                          f"{(fused or ['no ' + missing[0]])[0]}.")
    return _packed_tensors(shapes, projections, arch, scheme, dtype, device)


def _packed_tensors(shapes: dict[str, tuple[int, ...]], projections: dict[str, BlockProjection], arch: ArchConfig,
                    scheme: IntQuantScheme | None, dtype: torch.dtype, device: torch.device,
                    ) -> Iterator[tuple[str, torch.Tensor | PackedGgufTensor]]:
    for name, shape in sorted(shapes.items()):
        projection = projections.get(name)
        if projection is None:
            yield name, dense_tensor(name, shape, dtype, device)
        elif scheme is not None:
            prefix = name.removesuffix(".weight")
            # the parts of a merged layer (q, k, v; gate, up) see one input: act-order gives them one g_idx
            same_input = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            for piece, tensor in int_pieces(scheme, projection, generator_for(name, device), device,
                                            generator_for(same_input + ".g_idx", device)):
                yield f"{prefix}.{piece}", tensor
        else:
            yield name, gguf_tensor(name, projection, arch, dtype, device)


def pack_words(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned values (< 2^bits) -> int32 words along `dim`, the first value in the lowest bits."""
    per_word = 32 // bits
    moved = values.to(torch.int64).movedim(dim, -1)
    runs = moved.reshape(*moved.shape[:-1], -1, per_word)
    shifts = torch.arange(0, 32, bits, device=values.device, dtype=torch.int64)
    words = (runs << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def random_words(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """int32 words of random bits: every value they pack is uniform over its range."""
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * 4), dtype=torch.uint8, device=device, generator=generator)
    return raw.view(torch.int32)


def _scales(shape: tuple[int, ...], nominal: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    low, high = SCALE_SPREAD
    factor = torch.rand(shape, generator=generator, device=device) * (high - low) + low
    return (factor * nominal).to(torch.float16)


def _middle_zeros(shape: tuple[int, ...], bits: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    middle = 1 << (bits - 1)
    return torch.randint(middle - 1, middle + 1, shape, generator=generator, device=device)


def int_pieces(scheme: IntQuantScheme, projection: BlockProjection, generator: torch.Generator,
               device: torch.device, order_generator: torch.Generator | None = None) -> list[tuple[str, torch.Tensor]]:
    """One projection's tensors as `scheme.method` stores them (kernels/int_quant.py says each packing);
    an act-order scheme's column groups are drawn from `order_generator`."""
    bits, rows, cols = scheme.bits, projection.num_rows, projection.in_features
    groups = scheme.groups(cols)
    values_rms = ((4**bits - 1) / 12 + 0.25) ** 0.5  # of (q - zero) for q uniform, zero in the middle
    scales = _scales((rows, groups), DUMMY_INIT_STD / values_rms, generator, device)  # [N, G]
    g_idx = None
    if scheme.act_order:
        in_order = torch.arange(cols, device=device, dtype=torch.int32) // (cols // groups)
        g_idx = in_order[torch.randperm(cols, generator=order_generator or generator, device=device)]
    zeros = None if scheme.symmetric else _middle_zeros((rows, groups), bits, generator, device)  # [N, G]
    if scheme.method == "gptq":
        pieces = [("qweight", random_words((cols * bits // 32, rows), generator, device)),
                  ("scales", scales.t().contiguous())]
        if zeros is not None:
            pieces.append(("qzeros", pack_words(zeros.t(), bits, 1)))
        return pieces + ([("g_idx", g_idx)] if g_idx is not None else [])
    if scheme.method == "awq":  # 4 bits, with zeros; the interleave of a word does not matter for random values
        assert zeros is not None
        return [("qweight", random_words((cols, rows // 8), generator, device)),
                ("qzeros", pack_words(zeros.t(), 4, 1)), ("scales", scales.t().contiguous())]
    pieces = [("weight_packed", random_words((rows, cols * bits // 32), generator, device)), ("weight_scale", scales),
              ("weight_shape", torch.tensor([rows, cols], device=device))]
    if zeros is not None:
        pieces.append(("weight_zero_point", pack_words(zeros, bits, 0)))
    return pieces + ([("weight_g_idx", g_idx)] if g_idx is not None else [])


def gguf_tensor(name: str, projection: BlockProjection, arch: ArchConfig, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor | PackedGgufTensor:
    """One projection in its Q4_K_M type: random blocks with valid scales (or dense, llama.cpp's F16)."""
    shape = (projection.num_rows, projection.in_features)
    type_name = q4_k_m_type(projection, arch)
    if type_name == DENSE:
        return dense_tensor(name, shape, dtype, device)
    data = random_blocks(type_name, shape, generator_for(name, device), device)
    return PackedGgufTensor(data, GGML_TYPE_IDS[type_name], type_name, shape)
