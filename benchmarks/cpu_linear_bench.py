"""The embedded model's projections on this CPU, 2 threads: torch's int4 matmul (kernels/cpu_int4.py, Q4_1 blocks)
against bf16 `F.linear` and against bf16 through oneDNN with the weight prepacked (`mkldnn._reorder_linear_weight`,
then `mkldnn._linear_pointwise`: what inductor's freezing makes of a bf16 linear on the CPU), at 1 to 128 rows.
Milliseconds for a decode step's 120 projections (30 layers of qkv, o, gate_up, down; the lm_head apart),
one JSON line per row count, and whether the prepacked product equals F.linear's bit for bit.

    python benchmarks/cpu_linear_bench.py > results.jsonl
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from fitserve.kernels import cpu_int4, gguf

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LM_HEAD = (49152, 576)
LAYERS = 30
Q4_1 = next(t for t, block in gguf.BLOCK_TYPES.items() if block.name == "Q4_1")


def per_call_ms(fn, calls: int = 200) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def q4_1_blocks(num_rows: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    blocks = torch.randint(0, 256, (num_rows, in_features // 32 * 20), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(num_rows * in_features // 32, 2, generator=gen) * 0.01).half()
    blocks.view(-1, 20)[:, :4] = scales.view(torch.uint8).view(-1, 4)
    return blocks


def main() -> None:
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    layers = {name: q4_1_blocks(n, k, gen) for name, (n, k) in SHAPES.items()}
    lm_head = (torch.randn(*LM_HEAD, generator=gen) * 0.02).bfloat16()
    for rows in (1, 2, 4, 8, 16, 128):
        step = {"int4": 0.0, "bf16": 0.0, "bf16_prepacked": 0.0}
        exact = True
        for name, blocks in layers.items():
            k = SHAPES[name][1]
            weight4, scales_and_zeros = cpu_int4.int4_form(blocks, Q4_1)
            weight = gguf.dequantize(blocks, Q4_1, torch.bfloat16)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
            x = torch.randn(rows, k, generator=gen).bfloat16()
            step["int4"] += LAYERS * per_call_ms(lambda: cpu_int4.matmul(x, weight4, scales_and_zeros))
            step["bf16"] += LAYERS * per_call_ms(lambda: F.linear(x, weight))
            step["bf16_prepacked"] += LAYERS * per_call_ms(
                lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], ""))
            exact &= torch.equal(F.linear(x, weight),
                                 torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], ""))
        x = torch.randn(rows, LM_HEAD[1], generator=gen).bfloat16()
        packed_head = torch.ops.mkldnn._reorder_linear_weight(lm_head, rows)
        print(json.dumps({
            "rows": rows, "cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "projections_ms": {k: round(v, 2) for k, v in step.items()}, "prepacked_equals_f_linear": exact,
            "lm_head_ms": {"bf16": round(per_call_ms(lambda: F.linear(x, lm_head), 20), 3),
                           "bf16_prepacked": round(per_call_ms(
                               lambda: torch.ops.mkldnn._linear_pointwise(x, packed_head, None, "none", [None], ""),
                               20), 3)}}), flush=True)


if __name__ == "__main__":
    main()
