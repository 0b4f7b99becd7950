"""Start-up calibration of static fp8 activation scales (`--quantization fp8_per_tensor`).

One prefill forward of built-in text (CALIBRATION_TEXTS: prose, code, a table, numbers and
several languages, half of it through the model's chat template; none of it is in quantcheck's
prompts, so the quality check does not test on its own calibration data) through a paged KV
cache of its own, with every per-tensor fp8 layer noting the largest |x| it sees
(layers.formats.fp8.observe_activations). The caller tokenizes (calibration_token_ids with
the engine's tokenizer, which the runner cannot reach) and hands the same ids to every
tensor-parallel rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fitserve.layers.formats.fp8 import observe_activations
from fitserve.runner.profiling import (
    prefill_chunks,
    run_forward,
    throwaway_cache,
    unbind_cache,
)

MAX_TOKENS_PER_TEXT = 256

CALIBRATION_TEXTS = (
    ("The committee met on Tuesday to review the budget for the coming year. After a long "
     "discussion about maintenance costs, the members agreed to postpone the new library wing "
     "until the spring, when the final estimates from the contractors are expected."),
    ("def merge_sorted(a, b):\n    result, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
     "        if a[i] <= b[j]:\n            result.append(a[i]); i += 1\n        else:\n"
     "            result.append(b[j]); j += 1\n    return result + a[i:] + b[j:]\n"),
    ("| city | population | area (km2) |\n|---|---:|---:|\n| Lyon | 522,969 | 47.87 |\n"
     "| Porto | 231,800 | 41.42 |\n| Kraków | 804,237 | 326.8 |\n"),
    ("Photosynthesis converts light energy into chemical energy: chlorophyll absorbs mostly blue "
     "and red light, water is split, oxygen is released, and carbon dioxide is fixed into sugars "
     "through the Calvin cycle."),
    ("Le train de 7 h 42 pour Marseille partira de la voie 12. Bitte beachten Sie die geänderten "
     "Abfahrtszeiten. El museo abre de martes a domingo, de diez a seis."),
    ("User: My order arrived damaged, what should I do?\nAssistant: I'm sorry to hear that. Please "
     "reply with a photo of the damage and your order number, and we will send a replacement or "
     "a refund, whichever you prefer."),
    ("Q3 revenue rose 12.4% to $4.81 billion; operating margin was 18.2%, down from 19.7%. "
     "Guidance: EPS of $1.05 to $1.12, capex near $600 million, and 3,200 new hires."),
    ("Once upon a time, in a village at the edge of a pine forest, there lived an old clockmaker "
     "who repaired every clock in the valley but never fixed the one above his own door."),
)


def calibration_token_ids(encode: Callable[[str], list[int]],
                          encode_chat: Callable[[str], list[int]] | None = None) -> list[list[int]]:
    """CALIBRATION_TEXTS through `encode` (str -> token ids), each cut to MAX_TOKENS_PER_TEXT. With
    `encode_chat` (a user message -> ids through the model's chat template) every other text goes
    through the template instead: served prompts carry its special tokens, whose activations can
    be far larger than plain text's, and a static scale that never saw them would clip them."""
    ids = []
    for index, text in enumerate(CALIBRATION_TEXTS):
        chat = encode_chat is not None and index % 2 == 1
        ids.append(list(encode_chat(text) if chat else encode(text))[:MAX_TOKENS_PER_TEXT])
    return ids


@torch.inference_mode()
def calibrate_fp8_activation_scales(model: torch.nn.Module, token_ids: list[list[int]],
                                    device: torch.device) -> int:
    """Set the static input scale of every per-tensor fp8 layer of `model` from one forward of
    `token_ids` (one sequence each), through a throw-away KV cache as the profiling forward uses;
    returns how many layers it calibrated. The model is left bound to an empty KV cache: the
    runner binds its own."""
    chunks = prefill_chunks([tuple(ids) for ids in token_ids if ids], "calibration")
    with observe_activations(model) as num_layers:
        if num_layers:
            caches = throwaway_cache(model, model.arch, chunks, device)
            run_forward(model, chunks, device)
            del caches
    # An empty cache in its place, so that start-up's memory readings do not count this one.
    unbind_cache(model, model.arch, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the KV cache allocated next may need these segments
    return num_layers
