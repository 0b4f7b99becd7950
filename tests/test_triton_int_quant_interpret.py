"""The integer GEMV and GEMM kernels (kernels/triton_int_quant.py, triton_int_words.py) in Triton's
interpreter, on CPU tensors, against int_quant.int_quant_mm_reference: every kernel table of
VARIANTS at a row count in each of its buckets, 4 and 8 bits, groups of 32 and 128, whole rows and
act-order, columns that are not a multiple of a block; and GGUF's Q4_K in the K-quant form through every
table against the form's reference. Runs wherever triton is importable (the
interpreter needs no GPU; it has no bf16, so fp16 and fp32), in a child process because
TRITON_INTERPRET is read when the kernels are defined; skipped without triton (CPU torch).

    PYTHONPATH=src:/path/to/triton python -m pytest tests/test_triton_int_quant_interpret.py
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

# (num_cols, inner, group_size): 24 groups of 32; 3 of 128 (4 bits: 16-word segments); one group
# of 80 words (4 bits; 8-bit: 160), which splits into 16-word segments
SHAPES = ((33, 768, 32), (20, 384, 128), (17, 640, -1))
ROWS = (1, 3, 17, 40, 70)  # the GEMV, then the 16-, 32-, 64- and 128-row tiles of the words tables
TOLERANCE = 4e-3  # relative norm; the GPU tests' bound


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def distinct_cases(variants: dict) -> list[tuple[str, object, int]]:
    """(variant, table, rows): each distinct GEMV choice at ROWS[0], each distinct tile table at the rest."""
    cases, seen = [], set()
    for name, table in variants.items():
        for key, rows in ((table.gemv, ROWS[:1]), (table.tiles, ROWS[1:])):
            if key not in seen:
                seen.add(key)
                cases += [(name, table, num_rows) for num_rows in rows]
    return cases


def check_all() -> list[str]:
    """Every case; returns the failures (empty when all pass)."""
    from fitserve.kernels import int_quant, triton_int_quant

    failures = []
    gen = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        for num_cols, inner, group_size in SHAPES:
            groups = 1 if group_size == -1 else inner // group_size
            qweight = int_quant.store_values(torch.randint(0, 1 << bits, (num_cols, inner), dtype=torch.uint8,
                                                           generator=gen), bits)
            scales = torch.rand(num_cols, groups, generator=gen) * 0.01 + 1e-3
            zeros = torch.randint(0, 1 << bits, (num_cols, groups), dtype=torch.uint8, generator=gen)
            g_idx = (torch.randperm(inner, generator=gen) * groups // inner).to(torch.int32)
            for name, table, num_rows in distinct_cases(triton_int_quant.VARIANTS):
                dtype = torch.float16 if num_rows % 2 else torch.float32
                x = torch.randn(num_rows, inner, generator=gen).to(dtype)
                for order in (None, g_idx) if num_rows == ROWS[0] else (None,):
                    got = triton_int_quant.int_quant_mm(x, qweight, scales, zeros, order, bits, table)
                    expected = int_quant.int_quant_mm_reference(x, qweight, scales, zeros, order, bits)
                    err = relative_error(got, expected)
                    if got.dtype != dtype or not err < TOLERANCE:
                        failures.append(f"{name} bits={bits} shape={(num_cols, inner, group_size)} "
                                        f"rows={num_rows} act_order={order is not None}: {err:.2e}")
    return failures + check_k_form()


def check_k_form():
    """GGUF Q4_K in the K-quant form (kernels/gguf.py q4_k_words_form): every distinct GEMV and tile table
    at its row counts, and the words dequantizer (a table that takes it from 17 rows), against the
    form's reference; 3 and 5 blocks of 256 a row (partial tiles), columns not a multiple of a block."""
    from dataclasses import replace

    from fitserve.kernels import gguf, int_quant, triton_int_quant
    from fitserve.weights.dummy_gguf import random_blocks

    failures = []
    gen = torch.Generator().manual_seed(2)
    dequant = replace(triton_int_quant.DEFAULT_TABLE, dequant_min_rows=17)
    cases = distinct_cases(triton_int_quant.VARIANTS) + [("dequant_mm", dequant, rows) for rows in ROWS[2:]]
    for num_cols, inner in ((37, 768), (20, 1280)):
        form = gguf.q4_k_words_form(random_blocks("Q4_K", (num_cols, inner), gen, torch.device("cpu")))
        qweight, sub_scales, sub_mins, supers = form
        for name, table, num_rows in cases:
            dtype = torch.float16 if num_rows % 2 else torch.float32
            x = torch.randn(num_rows, inner, generator=gen).to(dtype)
            got = triton_int_quant.int_quant_mm(x, qweight, sub_scales, sub_mins, None, 4, table, supers=supers)
            expected = int_quant.int_quant_mm_reference(x, qweight, sub_scales, sub_mins, None, 4, supers=supers)
            err = relative_error(got, expected)
            if got.dtype != dtype or not err < TOLERANCE:
                failures.append(f"K-quant form {name} shape={(num_cols, inner)} rows={num_rows}: {err:.2e}")
    return failures


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter)")
def test_every_variant_matches_the_reference_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    failed = check_all()
    print("\n".join(failed) or "all cases match")
    sys.exit(1 if failed else 0)
