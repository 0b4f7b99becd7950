"""What fp8 weights alone cost on the quality check (CPU): `check-quant --quantization fp8` with
the activations left unquantized (W8A16: each Fp8Linear multiplies by its dequantized weight in
float32). An analysis for docs/quantization.md, not a serving mode.

    python benchmarks/fp8_weight_only_check.py weight_only > w8a16.json
    python benchmarks/fp8_weight_only_check.py w8a8 > w8a8.json   # the served fp8, for comparison
"""

from __future__ import annotations

import sys

import torch

from fitserve.cli import main
from fitserve.layers.formats import fp8 as quantization


def weight_only_forward(self: quantization.Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    scale = self.weight_scale.float() if self.per_tensor else self.weight_scale.float().reshape(-1, 1)
    return (x.float() @ (self.weight.float() * scale).T).to(x.dtype)


if __name__ == "__main__":
    if sys.argv[1:] == ["weight_only"]:
        quantization.Fp8Linear.forward = weight_only_forward
    elif sys.argv[1:] != ["w8a8"]:
        sys.exit("usage: fp8_weight_only_check.py weight_only|w8a8")
    sys.exit(main(["check-quant", "--quantization", "fp8", "--json"]))
