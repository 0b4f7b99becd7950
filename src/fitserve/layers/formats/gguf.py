"""The `gguf` weight format: a GGUF file's quantized blocks kept packed (`--quantization gguf`).

A layer holds each checkpoint tensor as the file stores it: a uint8 tensor [rows, K /
block_elements * block_bytes] of one GGML block type (kernels/gguf.py), so Q4_K weights take
4.5 bits each instead of 16. The type is only known when the tensor arrives, and a merged
projection may mix types (llama.cpp's Q4_K_M stores some attn_v and ffn_down in Q6_K), so the
parameters are created at load: after the checkpoint, consecutive shards of one type become
one parameter (`packed_<i>`, or `weight_<i>` in the serving dtype for a shard the file stores
in F16/F32), and `forward` multiplies each part and concatenates the outputs.

The matmul: on CUDA a decode batch of a few rows takes a Triton kernel that reads the packed blocks
and dequantizes them in registers (a GEMV for the first few rows, a small tensor-core GEMM above);
from triton_gguf.DEQUANT_MIN_ROWS rows the part is dequantized into a scratch buffer in the serving
dtype and multiplied by cuBLAS. A Q4_K part served in bf16/fp16 on CUDA is held instead in the integer
kernels' K-quant form (kernels/int_quant.py: the same 4-bit values as int32 words, each sub-block's
6-bit scale and min, each block's d and dmin; 148 bytes a block against the file's 144) and multiplied
as GPTQ's int4 is (triton_int_quant.int_quant_mm: the words GEMV with K split, the words tiles, the
words dequantizer before cuBLAS), the same weights bit for bit. On the CPU the layer is dequantized
in row chunks and multiplied (kernels/gguf.py matmul_reference): in float32 exactly what
dequantizing at load computes. A bf16 CPU layer holds no file bytes: its Q4_0 / Q4_1 / Q4_K parts in
torch's int4 CPU layout, multiplied by its packed int4 matmul (kernels/cpu_int4.py) for steps of up to
INT4_MAX_ROWS rows (decode), and every part dequantized to bf16 as at load, for more rows (prefill, where
the int4 matmul is the slower) and for the other types; about 1.3x the memory of dequantizing at load, for
twice the single-stream decode speed (docs/quantization.md). Byte counts for the planner come from the file's
header (plan/gguf_bytes.py), since `weight_specs` cannot know the types before the file is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fitserve.kernels import cpu_int4, gguf, int_quant
from fitserve.layers.formats.unquantized import UNQUANTIZED
from fitserve.layers.linear import linear
from fitserve.layers.weight_format import WEIGHT, LinearLayer, WeightFormat, WeightSpec
from fitserve.weights.gguf_packed import PackedGgufTensor

try:  # CUDA builds of torch bring Triton; without it the layer takes the torch path
    from fitserve.kernels import triton_gguf, triton_int_quant
except ImportError:
    triton_gguf = triton_int_quant = None  # type: ignore[assignment]

# Rows up to which a CPU int4 part multiplies by the int4 layout, above by its bf16 weights: on the 2-core
# AVX512 EPYC the SmolLM2 layer shapes took 0.45x bf16's time at one row, 1.05x at 8, 1.47x at 16 and 2.5x
# from 256 (docs/benchmarks.md)
INT4_MAX_ROWS = 8


@dataclass(frozen=True, slots=True)
class PackedPart:
    """Consecutive output rows of a layer stored in one parameter."""

    param_name: str  # "packed_0" (uint8 blocks) or "weight_0" (the serving dtype)
    ggml_type: int | None  # None: a dense part
    num_rows: int
    int4: bool = False  # a CPU int4 part: "weight_<i>" (its bf16 weights) and buffers int4_<i>, int4_scales_<i>
    k_form: bool = False  # a Q4_K part in int_quant's K-quant form: "packed_<i>" (the 4-bit values) and
    # buffers sub_scales_<i>, sub_mins_<i>, supers_<i>


def takes_k_form(ggml_type: int | None, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a part is held in the K-quant form (kernels/int_quant.py) for the integer words kernels: Q4_K
    served in 16 bits on CUDA (plan/gguf_bytes.py counts it)."""
    return (ggml_type == gguf.Q4_K and dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cuda"
            and triton_int_quant is not None)


class GgufLinear(LinearLayer):
    """y = x @ W.T with W held as packed GGUF blocks (or dense where the file stores it so)."""

    def __init__(self, in_features: int, out_features: int | tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(GGUF, in_features, out_features, dtype, device)
        self.device = torch.device(device)
        self._arrived: dict[int, tuple[int | None, torch.Tensor]] = {}  # shard -> (type, data) until finished
        self.parts: tuple[PackedPart, ...] = ()

    def load(self, shard_index: int, piece: str, tensor: torch.Tensor | PackedGgufTensor) -> None:
        if piece != WEIGHT:
            raise ValueError(f"a GGUF layer takes weights only, not {piece}")
        start, rows = self.shard_rows(shard_index)
        if not isinstance(tensor, PackedGgufTensor):  # F16/F32 in the file, or dummy weights
            self.check_shard_shape(shard_index, tensor)
            self._arrived[shard_index] = (None, tensor.to(device=self.device, dtype=self.dtype))
            return
        if tensor.ggml_type not in gguf.BLOCK_TYPES:
            raise ValueError(f"GGML type {tensor.type_name} cannot be kept packed")
        if tensor.shape != (rows, self.in_features):
            raise ValueError(f"shard {shard_index}: expected {(rows, self.in_features)}, got {tensor.shape}")
        row_bytes = gguf.BLOCK_TYPES[tensor.ggml_type].row_bytes(self.in_features)
        if tuple(tensor.data.shape) != (rows, row_bytes) or tensor.data.dtype != torch.uint8:
            raise ValueError(f"shard {shard_index}: {tensor.type_name} rows of {row_bytes} bytes expected, "
                             f"got {tuple(tensor.data.shape)} {tensor.data.dtype}")
        self._arrived[shard_index] = (tensor.ggml_type, tensor.data.to(self.device))

    @torch.no_grad()
    def finish_loading(self) -> None:
        """Every shard arrived: consecutive shards of one type become one parameter."""
        missing = [i for i in range(len(self.shard_sizes)) if i not in self._arrived]
        if missing:
            raise ValueError(f"shards {missing} never arrived")
        runs: list[tuple[int | None, list[torch.Tensor]]] = []
        for index in range(len(self.shard_sizes)):
            ggml_type, data = self._arrived.pop(index)
            if runs and runs[-1][0] == ggml_type:
                runs[-1][1].append(data)
            else:
                runs.append((ggml_type, [data]))
        parts = []
        cpu_bf16 = self.device.type == "cpu" and self.dtype == torch.bfloat16
        for number, (ggml_type, pieces) in enumerate(runs):
            data = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            int4 = ggml_type is not None and cpu_int4.takes(ggml_type, data.shape[0], self.dtype, self.device)
            if int4:
                weight, scales_and_zeros = cpu_int4.int4_form(data, ggml_type)
                self.register_buffer(f"int4_{number}", weight)
                self.register_buffer(f"int4_scales_{number}", scales_and_zeros)
            if ggml_type is not None and cpu_bf16:  # bf16 weights for many rows; other types only them (faster
                data = gguf.dequantize(data, ggml_type, self.dtype)  # than dequantizing at every step); as at load
                if not int4:
                    ggml_type = None  # a dense part
            k_form = takes_k_form(ggml_type, self.dtype, self.device)
            if k_form:
                data, sub_scales, sub_mins, supers = gguf.q4_k_words_form(data)
                self.register_buffer(f"sub_scales_{number}", sub_scales)
                self.register_buffer(f"sub_mins_{number}", sub_mins)
                self.register_buffer(f"supers_{number}", supers)
            name = f"{'packed' if ggml_type is not None and not int4 else 'weight'}_{number}"
            self.register_parameter(name, nn.Parameter(data.contiguous(), requires_grad=False))
            parts.append(PackedPart(name, ggml_type, data.shape[0], int4, k_form))
        self.parts = tuple(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in_features] -> [T, out_features] in x's dtype."""
        outs = [self._apply(part, x) for part in self.parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _apply(self, part: PackedPart, x: torch.Tensor) -> torch.Tensor:
        if part.int4:
            return self._int4_or_dense(part, x)
        data = getattr(self, part.param_name)
        if part.ggml_type is None:
            return linear(x, data)
        if part.k_form:
            sub_scales, sub_mins, supers = self._k_form(part)
            return triton_int_quant.int_quant_mm(x, data, sub_scales, sub_mins, None, 4, supers=supers)
        if x.is_cuda and triton_gguf is not None:
            if triton_gguf.supports(x, part.ggml_type):
                return triton_gguf.matmul(x, data, part.ggml_type)
            chunk_rows = max(1, triton_gguf.PREFILL_CHUNK_ELEMENTS // self.in_features)
            return gguf.matmul_reference(x, data, part.ggml_type, chunk_rows=chunk_rows)
        return gguf.matmul_reference(x, data, part.ggml_type)

    @staticmethod
    def _number(part: PackedPart) -> str:
        return part.param_name.rsplit("_", 1)[1]

    def _k_form(self, part: PackedPart) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A K-quant part's (sub_scales, sub_mins, supers) buffers."""
        number = self._number(part)
        return tuple(getattr(self, f"{name}_{number}") for name in ("sub_scales", "sub_mins", "supers"))

    def _int4_or_dense(self, part: PackedPart, x: torch.Tensor) -> torch.Tensor:
        """A CPU int4 part: the int4 matmul up to INT4_MAX_ROWS rows, the bf16 weights above. Traced with
        symbolic rows (the packaged decode step: runner/cpu_aot.py), the choice is a torch.cond, so one
        package serves both."""
        number = self._number(part)
        int4, scales = getattr(self, f"int4_{number}"), getattr(self, f"int4_scales_{number}")
        weight = getattr(self, part.param_name)

        def few_rows(x: torch.Tensor) -> torch.Tensor:
            return cpu_int4.matmul(x, int4, scales)

        def many_rows(x: torch.Tensor) -> torch.Tensor:
            return linear(x, weight)

        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return torch.cond(x.shape[0] <= INT4_MAX_ROWS, few_rows, many_rows, (x,))
        return few_rows(x) if x.shape[0] <= INT4_MAX_ROWS else many_rows(x)

    @torch.no_grad()
    def dequantized(self) -> LinearLayer:
        """An unquantized layer holding these weights dequantized to the serving dtype (through float32, as
        loading the file without --quantization gguf does; check-quant's reference for a packed file)."""
        layer = UNQUANTIZED.create(self.in_features, self.shard_sizes, self.dtype, self.device)
        start = 0
        for part in self.parts:
            data = getattr(self, part.param_name)
            if part.k_form:
                rows = int_quant.dequantize_k(data, *self._k_form(part), self.dtype)
            elif part.ggml_type is None or part.int4:
                rows = data
            else:
                rows = gguf.dequantize(data, part.ggml_type).to(self.dtype)
            layer.weight[start:start + part.num_rows].copy_(rows)
            start += part.num_rows
        return layer

    def packed_bytes(self) -> int:
        """Bytes this layer holds (its parameters and the K-quant form's scales), after finish_loading."""
        held = [*self.parameters(), *(b for name, b in self.named_buffers() if not name.startswith("int4"))]
        return sum(t.numel() * t.element_size() for t in held)


@dataclass(frozen=True, slots=True)
class GgufFormat(WeightFormat):
    """`gguf`: the tensors and their types come from the file, so a layer declares no specs up front."""

    name: str = "gguf"
    fused_input_quantization: bool = False

    def weight_specs(self, in_features: int, shard_sizes: tuple[int, ...], dtype: torch.dtype
                     ) -> tuple[WeightSpec, ...]:
        return ()  # created at load (GgufLinear.finish_loading); the planner reads the header

    def create(self, in_features: int, out_features: int | tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> GgufLinear:
        return GgufLinear(in_features, out_features, dtype, device)


GGUF = GgufFormat()
