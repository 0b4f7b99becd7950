"""What changes a row's logits before sampling, beyond temperature and the top-k/top-p/min-p
filters: repetition, frequency and presence penalties, logit_bias, min_tokens and allowed_token_ids.

Only rows whose requests ask for one of these pay for it. The penalties need, per request,
how often each token occurred in its output (and, for the repetition penalty, which tokens its
prompt holds). That lives on the device in one slab, a row per request, updated from the
sampled ids after each step without a host round trip, and freed when the scheduler reports the
request finished. A preempted request keeps its row: recomputing its KV cache changes nothing
in its output, so its counts stay right.
"""

from __future__ import annotations

import torch

from fitserve.core.outputs import ScheduledRequest
from fitserve.runner.input_batch import to_device

INITIAL_SLAB_ROWS = 8  # rows of the count slab allocated on first use; doubled when full


class TokenCounts:
    """Per tracked request: output token counts [V] int32 and a prompt-token mask [V] bool."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._slots: dict[str, int] = {}
        self._free_slots: list[int] = []
        self.output_counts = torch.zeros(0, 0, dtype=torch.int32, device=device)  # [slots, V]
        self.prompt_mask = torch.zeros(0, 0, dtype=torch.bool, device=device)  # [slots, V]

    @property
    def num_tracked(self) -> int:
        return len(self._slots)

    def slot(self, chunk: ScheduledRequest, vocab_size: int) -> int:
        """The request's row, made (zeroed, with its prompt marked) the first time it is seen."""
        slot = self._slots.get(chunk.request_id)
        if slot is not None:
            return slot
        if not self._free_slots:
            self._grow(vocab_size)
        slot = self._free_slots.pop()
        self.output_counts[slot].zero_()
        self.prompt_mask[slot].zero_()
        prompt = chunk.prompt_token_ids
        if chunk.sampling_params.repetition_penalty != 1.0:
            # The scheduler sends the prompt on every chunk before the first output, so the chunk
            # that samples first carries it.
            assert prompt is not None, "a repetition-penalty request was first sampled without its prompt"
            ids = to_device(prompt, torch.int64, self.device)
            self.prompt_mask[slot, ids[ids < vocab_size]] = True
        self._slots[chunk.request_id] = slot
        return slot

    def _grow(self, vocab_size: int) -> None:
        old_rows = self.output_counts.shape[0]
        new_rows = max(INITIAL_SLAB_ROWS, 2 * old_rows)
        counts = torch.zeros(new_rows, vocab_size, dtype=torch.int32, device=self.device)
        mask = torch.zeros(new_rows, vocab_size, dtype=torch.bool, device=self.device)
        if old_rows:
            counts[:old_rows] = self.output_counts
            mask[:old_rows] = self.prompt_mask
        self.output_counts, self.prompt_mask = counts, mask
        self._free_slots.extend(reversed(range(old_rows, new_rows)))

    def forget(self, request_ids: frozenset[str]) -> None:
        for request_id in request_ids:
            slot = self._slots.pop(request_id, None)
            if slot is not None:
                self._free_slots.append(slot)
        if not self._slots and self.output_counts.shape[0]:
            # Nobody uses penalties now: give the slab's memory back.
            self.output_counts = torch.zeros(0, 0, dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
            self._free_slots.clear()

    def record(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """slots: [R] int64 rows; token_ids: [R] int64, the tokens just sampled for them."""
        ones = torch.ones_like(token_ids, dtype=torch.int32)
        self.output_counts.index_put_((slots, token_ids), ones, accumulate=True)


def apply_penalties(logits: torch.Tensor, rows: list[int], chunks: list[ScheduledRequest],
                    counts: TokenCounts) -> list[int]:
    """In place on logits [N, V] float32, for the given rows; returns their slab slots.

    vLLM's semantics: the repetition penalty (HF's) scales the logits of tokens seen in the
    prompt or the output; frequency and presence penalties subtract per occurrence / once for
    tokens seen in the output only.
    """
    vocab_size = logits.shape[-1]
    slots = [counts.slot(chunks[row], vocab_size) for row in rows]
    params = [chunks[row].sampling_params for row in rows]
    device = logits.device
    row_index = to_device(rows, torch.int64, device)
    slot_index = to_device(slots, torch.int64, device)
    factors = to_device([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params],
                        logits.dtype, device)  # [R, 3]
    repetition, frequency, presence = factors[:, 0:1], factors[:, 1:2], factors[:, 2:3]
    row_logits = logits[row_index]  # [R, V]
    output_counts = counts.output_counts[slot_index]  # [R, V] int32
    in_output = output_counts > 0
    seen = in_output | counts.prompt_mask[slot_index]
    scaled = torch.where(row_logits > 0, row_logits / repetition, row_logits * repetition)
    row_logits = torch.where(seen, scaled, row_logits)
    row_logits -= frequency * output_counts + presence * in_output
    logits[row_index] = row_logits
    return slots


def apply_logit_bias(logits: torch.Tensor, rows: list[int], chunks: list[ScheduledRequest]) -> None:
    """Add each row's logit_bias (token ids were checked against the vocabulary by the engine)."""
    row_ids, token_ids, biases = [], [], []
    for row in rows:
        for token_id, bias in chunks[row].sampling_params.logit_bias:
            row_ids.append(row)
            token_ids.append(token_id)
            biases.append(bias)
    device = logits.device
    index = (to_device(row_ids, torch.int64, device), to_device(token_ids, torch.int64, device))
    logits.index_put_(index, to_device(biases, logits.dtype, device), accumulate=True)


def apply_min_tokens(logits: torch.Tensor, rows: list[int], chunks: list[ScheduledRequest]) -> None:
    """Mask EOS and stop_token_ids (to -inf) in rows whose output is still shorter than min_tokens."""
    vocab_size = logits.shape[-1]
    row_ids, token_ids = [], []
    for row in rows:
        for token_id in chunks[row].sampling_params.min_tokens_stop_ids:
            if token_id < vocab_size:  # a stop id past the vocabulary can never be sampled anyway
                row_ids.append(row)
                token_ids.append(token_id)
    if row_ids:
        device = logits.device
        logits[to_device(row_ids, torch.int64, device), to_device(token_ids, torch.int64, device)] = float("-inf")


def allowed_token_mask(token_ids: tuple[int, ...], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[V] bool, True at a request's allowed_token_ids (checked against the vocabulary by the engine)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[to_device(token_ids, torch.int64, device)] = True
    return mask


def apply_allowed_token_ids(logits: torch.Tensor, rows: list[int], masks: list[torch.Tensor]) -> None:
    """Every token outside a row's mask (allowed_token_mask) to -inf."""
    index = to_device(rows, torch.int64, logits.device)
    logits[index] = logits[index].masked_fill(~torch.stack(masks), float("-inf"))
