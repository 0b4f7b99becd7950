"""Gemma 3, text (`Gemma3ForCausalLM`: 270M, 1B), and the text tower of the image-text checkpoints
(`Gemma3ForConditionalGeneration`: 4B, 12B, 27B).

Gemma 2's blocks (models/gemma2.py) plus what transformers' modeling_gemma3.py adds:
- an RMSNorm of the (1 + weight) form on each q and k head (q_norm, k_norm [head_dim]) before rotary;
- the local ("sliding_attention") layers rotate with their own base, rope_local_base_freq (10,000),
  without the rope scaling of the global layers (linear, factor 8, on 4B and up);
- five local layers to one global (layer_types, or sliding_window_pattern in older configs);
- no soft-caps (config.json may set them; they are applied when it does).

An image-text checkpoint is served as its text model: config.json's text_config gives the shapes, its
`language_model.*` (transformers 4.50-4.51) or `model.language_model.*` (later) tensors the weights,
and the vision tower and projector tensors are skipped. Requests carry text only (docs/models.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from fitserve.layers.parallel import TensorShard
from fitserve.models.gemma2 import Gemma2ForCausalLM
from fitserve.plan.shapes import VISION_TENSOR_PREFIXES

# prefixes of the image-text checkpoint's tensors -> the text model's names (models/llama.py reads `model.*`)
_TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                  ("model.language_model.", "model."))


def text_tensor_name(hf_name: str) -> str | None:
    """An image-text checkpoint's tensor name as the text model's (unchanged for a text checkpoint);
    None for a tensor of the vision tower or its projector."""
    if hf_name.startswith(VISION_TENSOR_PREFIXES):
        return None
    for prefix, replacement in _TEXT_PREFIXES:
        if hf_name.startswith(prefix):
            return replacement + hf_name.removeprefix(prefix)
    return hf_name


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma2ForCausalLM built from a Gemma 3 ArchConfig (qk_norm, rope_local_theta, no soft-caps) that
    also reads the text tower of Gemma3ForConditionalGeneration checkpoints."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The text model's tensors under its own names (those expected_weight_names lists); the
        vision tower's are skipped."""

        def text_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for hf_name, tensor in weights:
                name = text_tensor_name(hf_name)
                if name is not None:
                    yield name, tensor

        return super().load_weights(text_weights())

    def checkpoint_slice(self, hf_name: str) -> TensorShard | None:
        """A vision tensor is read whole (and skipped); a text one sliced by its text-model name."""
        name = text_tensor_name(hf_name)
        return None if name is None else super().checkpoint_slice(name)
