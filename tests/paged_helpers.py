"""Test helper: drive a model through the paged KV cache without the engine (ForwardBatch by hand)."""

from __future__ import annotations

import random

import torch

from fitserve.forward_batch import PAD_SLOT, ForwardBatch
from fitserve.sampling_params import SamplingParams


def make_batch(input_ids: list[int], positions: list[int], slots: list[int], query_lens: list[int],
               seq_lens: list[int], block_tables: list[list[int]], num_pad_rows: int = 0,
               device: str = "cpu") -> ForwardBatch:
    """A ForwardBatch from host lists; num_pad_rows extra PAD_SLOT rows imitate CUDA-graph padding."""
    input_ids = input_ids + [0] * num_pad_rows
    positions = positions + [0] * num_pad_rows
    slots = slots + [PAD_SLOT] * num_pad_rows
    max_blocks = max(len(t) for t in block_tables)
    table = [t + [0] * (max_blocks - len(t)) for t in block_tables]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    ends = starts[1:]
    return ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(table, dtype=torch.int32, device=device),
        logits_indices=torch.tensor([e - 1 for e in ends], dtype=torch.int64, device=device),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=tuple(query_lens), seq_lens_cpu=tuple(seq_lens),
    )


class PagedDriver:
    """Owns a KV cache for `model` and feeds chunks of several requests as one flat batch."""

    def __init__(self, model, num_blocks: int = 64, block_size: int = 4, seed: int = 0, device: str = "cpu") -> None:
        arch = model.arch
        shape = (num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)
        self.device = device
        self.caches = [(torch.zeros(shape, dtype=model.dtype, device=device),
                        torch.zeros(shape, dtype=model.dtype, device=device))
                       for _ in range(arch.num_hidden_layers)]
        model.bind_kv_cache(self.caches)
        self.model, self.block_size = model, block_size
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)  # non-contiguous tables exercise the gather
        self.tables: dict[str, list[int]] = {}
        self.num_computed: dict[str, int] = {}

    def step(self, chunks: list[tuple[str, list[int]]], num_pad_rows: int = 0) -> torch.Tensor:
        """Feed each (request, token ids) chunk; returns logits [S, vocab] float32 of each chunk's last row."""
        ids, positions, slots, query_lens, seq_lens, tables = [], [], [], [], [], []
        for req, tokens in chunks:
            start = self.num_computed.get(req, 0)
            table = self.tables.setdefault(req, [])
            end = start + len(tokens)
            while len(table) * self.block_size < end:
                table.append(self.free_blocks.pop())
            ids += tokens
            positions += list(range(start, end))
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]
            query_lens.append(len(tokens))
            seq_lens.append(end)
            tables.append(list(table))
            self.num_computed[req] = end
        batch = make_batch(ids, positions, slots, query_lens, seq_lens, tables, num_pad_rows, device=self.device)
        hidden = self.model(batch)
        return self.model.compute_logits(hidden[batch.logits_indices])

    def greedy(self, prompts: dict[str, list[int]], max_new_tokens: int) -> dict[str, list[int]]:
        """Prefill all prompts in one batch, then decode them together; returns generated ids."""
        out = {req: [] for req in prompts}
        logits = self.step(list(prompts.items()))
        for _ in range(max_new_tokens):
            next_ids = logits.argmax(-1).tolist()
            for req, tok in zip(prompts, next_ids):
                out[req].append(tok)
            if len(out[next(iter(prompts))]) == max_new_tokens:
                break
            logits = self.step([(req, [tok]) for req, tok in zip(prompts, next_ids)])
        return out


def engine_greedy_tokens(engine, vocab_size: int) -> dict[str, list[int]]:
    """Run 11 requests (5 to 35 prompt tokens; 11 decode rows pad to the graph of 16) to 20 greedy
    tokens each through `engine`; request id -> its output tokens."""
    for i in range(11):
        prompt = [(7 * i + j) % vocab_size for j in range(5 + 3 * i)]
        engine.add_request(engine.make_request(f"r{i}", prompt, SamplingParams(max_tokens=20, temperature=0)))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens
