"""The figures of a quantization check and their text and JSON forms (torch-free)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

AGREEMENT_TARGET = 0.97  # top-1 agreement fp8 weights should reach (docs/quantization.md)
SHOWN_TEXT_CHARS = 160  # of each greedy continuation in the side-by-side table


@dataclass(frozen=True, slots=True)
class PromptComparison:
    """One built-in prompt: teacher-forced figures over prompt + the reference's continuation."""

    prompt: str
    reference_text: str  # greedy continuation under the reference setting
    quantized_text: str  # greedy continuation under the quantized setting
    num_positions: int  # every position of prompt + reference continuation
    num_agree: int  # positions whose most likely next token is the same in both settings
    num_generated_positions: int  # the positions that predicted the reference continuation
    num_generated_agree: int
    kl_sum: float  # sum over positions of KL(reference || quantized), nats
    first_divergence: int | None  # first generated token that differs; None when identical


class AgreementRatios:
    """Top-1 agreement, on the generated tokens, and mean KL, from the totals a subclass holds:
    num_positions, num_agree, num_generated_positions, num_generated_agree and kl_sum."""

    __slots__ = ()
    num_positions: int
    num_agree: int
    num_generated_positions: int
    num_generated_agree: int
    kl_sum: float

    @property
    def top1_agreement(self) -> float:
        return self.num_agree / max(1, self.num_positions)

    @property
    def generated_agreement(self) -> float:
        return self.num_generated_agree / max(1, self.num_generated_positions)

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / max(1, self.num_positions)


@dataclass(frozen=True, slots=True)
class NoiseFloor(AgreementRatios):
    """The reference model run in float32, compared with the reference (`check-quant --noise-floor`): how far
    the reference dtype's own rounding moves the figures, the scale to read the quantized ones against."""

    setting: str  # e.g. "weights float32, KV cache float32"
    num_positions: int
    num_agree: int
    num_generated_positions: int
    num_generated_agree: int
    kl_sum: float  # nats, KL(reference || float32) summed over positions

    def to_json(self) -> dict[str, Any]:
        return {"setting": self.setting, "top1_agreement": self.top1_agreement,
                "generated_agreement": self.generated_agreement, "mean_kl": self.mean_kl}


@dataclass(frozen=True, slots=True)
class QuantReport(AgreementRatios):
    model: str
    device: str
    reference: str  # e.g. "weights bfloat16, KV cache bfloat16"
    quantized: str  # e.g. "weights fp8, KV cache fp8"
    max_new_tokens: int
    prompts: tuple[PromptComparison, ...]
    seconds: float
    noise_floor: NoiseFloor | None = None
    # a packed checkpoint compared with an original: its kernels against its own dequantized weights
    kernel_check: NoiseFloor | None = None

    # The totals over the prompts (AgreementRatios turns them into the figures).
    @property
    def num_positions(self) -> int:
        return sum(p.num_positions for p in self.prompts)

    @property
    def num_agree(self) -> int:
        return sum(p.num_agree for p in self.prompts)

    @property
    def num_generated_positions(self) -> int:
        return sum(p.num_generated_positions for p in self.prompts)

    @property
    def num_generated_agree(self) -> int:
        return sum(p.num_generated_agree for p in self.prompts)

    @property
    def kl_sum(self) -> float:
        return sum(p.kl_sum for p in self.prompts)

    @property
    def num_identical(self) -> int:
        return sum(p.first_divergence is None for p in self.prompts)

    def summary(self) -> str:
        text = (f"{self.quantized} vs {self.reference}: top-1 agreement {self.top1_agreement:.2%} over "
                f"{self.num_positions} positions ({self.generated_agreement:.2%} on generated tokens), mean KL "
                f"{self.mean_kl:.4f} nats, {self.num_identical}/{len(self.prompts)} greedy continuations identical")
        if self.kernel_check is not None:
            text += (f"; against its own dequantized weights ({self.kernel_check.setting}): top-1 agreement "
                     f"{self.kernel_check.top1_agreement:.2%}, mean KL {self.kernel_check.mean_kl:.4f} nats")
        if self.noise_floor is not None:
            text += (f"; noise floor ({self.noise_floor.setting}): top-1 agreement "
                     f"{self.noise_floor.top1_agreement:.2%}, mean KL {self.noise_floor.mean_kl:.4f} nats")
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "device": self.device, "reference": self.reference, "quantized": self.quantized,
            "max_new_tokens": self.max_new_tokens, "num_prompts": len(self.prompts),
            "num_positions": self.num_positions, "top1_agreement": self.top1_agreement,
            "generated_agreement": self.generated_agreement, "mean_kl": self.mean_kl,
            "identical_continuations": self.num_identical, "seconds": self.seconds,
            "noise_floor": self.noise_floor.to_json() if self.noise_floor is not None else None,
            "kernel_check": self.kernel_check.to_json() if self.kernel_check is not None else None,
            "prompts": [
                {"prompt": p.prompt, "reference": p.reference_text, "quantized": p.quantized_text,
                 "positions": p.num_positions, "agree": p.num_agree, "mean_kl": p.kl_sum / max(1, p.num_positions),
                 "first_divergence": p.first_divergence}
                for p in self.prompts
            ],
        }


def _clip(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SHOWN_TEXT_CHARS else flat[:SHOWN_TEXT_CHARS - 3] + "..."


def _noise_floor_lines(floor: NoiseFloor | None, heading: str = "noise floor: the reference model as {}, "
                                                                  "against the reference") -> list[str]:
    if floor is None:
        return []
    return [
        "  " + heading.format(floor.setting),
        f"    top-1 next-token agreement {floor.top1_agreement:8.2%}",
        f"    on the generated tokens    {floor.generated_agreement:8.2%}",
        f"    mean KL                    {floor.mean_kl:8.4f} nats",
    ]


def format_report(report: QuantReport) -> str:
    lines = [
        f"fitserve check-quant: {report.model} on {report.device}, {len(report.prompts)} built-in prompts, "
        f"{report.max_new_tokens} greedy tokens each ({report.seconds:.1f} s)",
        f"  reference: {report.reference}",
        f"  quantized: {report.quantized}",
        "",
        f"  top-1 next-token agreement   {report.top1_agreement:8.2%}  ({report.num_positions} teacher-forced positions)",
        f"    on the generated tokens    {report.generated_agreement:8.2%}",
        f"  mean KL(reference || quant)  {report.mean_kl:8.4f} nats",
        f"  identical greedy outputs     {report.num_identical:5d} / {len(report.prompts)}",
        *_noise_floor_lines(report.noise_floor),
        *_noise_floor_lines(report.kernel_check, "kernel check: the quantized setting against its own {}"),
        "",
        "Greedy continuations, reference | quantized (the first differing token marked by its index):",
    ]
    for index, p in enumerate(report.prompts, 1):
        same = "identical" if p.first_divergence is None else f"differs from token {p.first_divergence}"
        lines.append(f"{index:2d}. {_clip(p.prompt)}  [{p.num_agree}/{p.num_positions} agree, {same}]")
        lines.append(textwrap.indent(f"ref:   {_clip(p.reference_text)}", "    "))
        if p.first_divergence is not None:
            lines.append(textwrap.indent(f"quant: {_clip(p.quantized_text)}", "    "))
    verdict = "meets" if report.top1_agreement >= AGREEMENT_TARGET else "is below"
    lines += ["", f"Verdict: top-1 agreement {verdict} the {AGREEMENT_TARGET:.0%} target for fp8 weights."]
    if report.noise_floor is not None:
        lines.append(f"The reference's own rounding (against {report.noise_floor.setting}) already costs "
                     f"{1 - report.noise_floor.top1_agreement:.2%} of top-1 agreement on these prompts.")
    return "\n".join(lines)
