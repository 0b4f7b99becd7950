"""Structured output on the device: set the logits of tokens a request's grammar forbids to -inf.

The engine sends, per constrained sampling request, a packed bitmask of the tokens its grammar
allows next (`ScheduledRequest.allowed_token_bitmask`, little-endian int32 words). Masking
happens before any sampling arithmetic, so greedy and sampled rows, and both the eager and
the CUDA-graph decode paths (which compute logits after the replay), obey it.
"""

from __future__ import annotations

import torch

from fitserve.core.outputs import ScheduledRequest
from fitserve.runner.input_batch import to_device

BITS_PER_WORD = 32


def unpack_token_bitmask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """words: [R, W] int32 -> allowed: [R, vocab_size] bool (tokens past 32 * W are not allowed)."""
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=words.device)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).bool().reshape(words.shape[0], -1)  # [R, 32 * W]
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]), value=False)


def apply_allowed_token_masks(logits: torch.Tensor, chunks: list[ScheduledRequest]) -> torch.Tensor:
    """logits: [N, vocab] float32, one row per chunk. Returns them with forbidden tokens at -inf."""
    rows = [row for row, chunk in enumerate(chunks) if chunk.allowed_token_bitmask is not None]
    if not rows:
        return logits
    packed = bytearray(b"".join(chunks[row].allowed_token_bitmask for row in rows))  # type: ignore[misc]
    words = torch.frombuffer(packed, dtype=torch.int32).view(len(rows), -1).to(logits.device)  # [R, W]
    allowed = unpack_token_bitmask(words, logits.shape[-1])  # [R, vocab] bool
    index = to_device(rows, torch.int64, logits.device)
    masked = logits[index].masked_fill(~allowed, float("-inf"))
    return logits.index_put((index,), masked)
