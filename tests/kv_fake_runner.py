"""A fake runner with a fake KV cache, for prefix-caching tests (torch-free).

Each slot holds a number standing for a token's K/V: a rolling hash of every token of the
request up to and including it, as a real token's K/V depend on its whole prefix. A step
reads every context slot through the block table (checking each continues the one before),
extends the hash over the fed tokens, writes their slots, and samples from the hash. So a request served a block computed for
other tokens, or a slot never written, gets other tokens (or an error): outputs with prefix
caching equal outputs without it only if every reused block holds exactly what it should.
"""

from __future__ import annotations

from fitserve.core.outputs import RunnerOutput, SchedulerOutput
from fitserve.testing import FakeRunner

HASH_MODULUS = (1 << 61) - 1
HASH_BASE = 1_000_003
START = 12345  # the hash of the empty prefix


def extend(value: int, token_id: int) -> int:
    return (value * HASH_BASE + token_id + 1) % HASH_MODULUS


def sample(value: int, vocab_size: int) -> int:
    return value % (vocab_size - 1)  # never the last id, which the tests use as EOS


def expected_tokens(prompt: list[int], num_tokens: int, vocab_size: int) -> list[int]:
    """What a request generates on this runner, computed without any cache."""
    value, tokens = START, []
    for token_id in prompt:
        value = extend(value, token_id)
    for _ in range(num_tokens):
        tokens.append(sample(value, vocab_size))
        value = extend(value, tokens[-1])
    return tokens


class KVCheckingRunner(FakeRunner):
    def __init__(self, num_blocks: int = 64, block_size: int = 4, vocab_size: int = 1000) -> None:
        super().__init__(num_blocks, block_size, vocab_size)
        self.slots: dict[int, tuple[int, int, int]] = {}  # slot -> (position, token id, prefix hash)
        self.num_fed_tokens = 0

    def _slot(self, block_table: tuple[int, ...], position: int) -> int:
        size = self.capacity.block_size
        return block_table[position // size] * size + position % size

    def _read_context(self, block_table: tuple[int, ...], num_tokens: int) -> int:
        """The prefix hash after the first `num_tokens` slots, checking that every slot was
        written, holds its position, and continues the slot before it (as attention reads them all)."""
        value = START
        for position in range(num_tokens):
            stored_position, token_id, stored = self.slots[self._slot(block_table, position)]
            assert stored_position == position, f"slot of position {position} holds position {stored_position}"
            value = extend(value, token_id)
            assert stored == value, f"position {position} was computed after other tokens"
        return value

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        super().execute(scheduler_output)  # the plan checks (block table long enough, ...)
        sampled = {}
        for chunk in scheduler_output.scheduled:
            value = self._read_context(chunk.block_table, chunk.num_computed_tokens)
            for offset, token_id in enumerate(chunk.token_ids):
                value = extend(value, token_id)
                position = chunk.num_computed_tokens + offset
                self.slots[self._slot(chunk.block_table, position)] = (position, token_id, value)
            self.num_fed_tokens += chunk.num_tokens
            if chunk.samples:
                sampled[chunk.request_id] = sample(value, self.vocab_size)
        return RunnerOutput(sampled_token_ids=sampled)
