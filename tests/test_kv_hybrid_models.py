"""Gemma 2 and Gemma 3 (tiny checkpoints written by transformers' own classes) through the whole engine
with KV cache groups (kv_groups.py): a window of 8 tokens on blocks of 4, prompts and outputs well past
it, a pool small enough to preempt. Every sampled token's float32 logprobs equal transformers' on the
same sequence, so greedy tokens are transformers'; the windowed groups stay bounded while the full
group grows, and the pool is whole again at the end."""

from __future__ import annotations

import pytest
import torch
import transformers

from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig
from fitserve.llm import build_engine
from fitserve.sampling_params import SamplingParams
from hf_compare_helpers import save_random_checkpoint
from test_models_gemma import MODELS

WINDOW = 8
BLOCK_SIZE = 4
NUM_BLOCKS = 64  # Gemma 2's 3 groups (3 layers: 1 full, 2 windowed), Gemma 3's 4: 4 requests need more
MAX_TOKENS = 24
LOGPROB_TOL = 2e-4  # float32


def write_checkpoint(folder, name: str):
    make_config, model_class = MODELS[name]
    config = make_config()
    config.sliding_window = WINDOW
    torch.manual_seed(0)
    return save_random_checkpoint(folder, model_class(config).eval())


def make_engine(folder, device: str = "cpu"):
    config = EngineConfig(model=str(folder), dtype="float32", device=device,
                          cache=CacheConfig(num_gpu_blocks_override=NUM_BLOCKS, block_size=BLOCK_SIZE),
                          scheduler=SchedulerConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=24))
    return build_engine(config, progress=False).engine


def run(engine, prompts: dict[str, list[int]]):
    """Every request to MAX_TOKENS greedy tokens with their logprobs; the most blocks each group held."""
    for rid, prompt in prompts.items():
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=3, ignore_eos=True)
        engine.add_request(engine.make_request(rid, prompt, params))
    tokens, logprobs = {rid: [] for rid in prompts}, {rid: [] for rid in prompts}
    kv = engine.kv_cache
    most = [0] * kv.num_groups
    decode_most = [0] * kv.num_groups  # held by requests whose last step fed one token
    computed: dict[str, int] = {}
    while engine.has_unfinished:
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            logprobs[out.request_id].extend(out.new_logprobs)
        engine.check_invariants()
        for request in engine.scheduler.running:
            decodes = request.num_computed_tokens == computed.get(request.request_id, -2) + 1
            computed[request.request_id] = request.num_computed_tokens
            for group in range(kv.num_groups):
                held = kv.num_held_blocks(request.request_id, group)
                most[group] = max(most[group], held)
                if decodes:
                    decode_most[group] = max(decode_most[group], held)
    return tokens, logprobs, most, decode_most


PROMPTS = {f"r{i}": [(11 * i + 3 * j) % 300 + 3 for j in range(6 + 8 * i)] for i in range(4)}


def check_hybrid_engine(engine, hf, tol: float = LOGPROB_TOL) -> None:
    """PROMPTS through `engine` (a hybrid model): preemptions, bounded windowed groups, a growing full
    group, every block back at the end, and each sampled token's logprobs within `tol` of transformers'
    (on the CPU) on the same sequence; a greedy token is transformers' argmax, or within `tol` of it."""
    kv = engine.kv_cache
    assert kv.group_windows[0] is None and set(kv.group_windows[1:]) == {WINDOW}
    assert not kv.enable_caching, "prefix caching is off for a hybrid model"
    tokens, logprobs, most, decode_most = run(engine, PROMPTS)

    assert engine.scheduler.num_preemptions_total > 0, "the pool is small enough to preempt"
    assert kv.num_free_blocks == NUM_BLOCKS and kv.pool.num_used_blocks == 0, "every group's blocks came back"
    bound = -(-WINDOW // BLOCK_SIZE) + 1
    assert max(decode_most[1:]) <= bound, f"a windowed group held {decode_most[1:]} blocks, bound {bound}"
    longest = max(len(p) for p in PROMPTS.values()) + MAX_TOKENS - 2  # in the cache after its last step but one
    # async scheduling (CUDA) plans a request that may end on EOS once more: one slot past that
    most_blocks = (-(-longest // BLOCK_SIZE), -(-(longest + 1) // BLOCK_SIZE))
    assert most_blocks[0] <= most[0] <= most_blocks[1] and most[0] > bound, (
        f"the full-attention group keeps every block: held {most[0]}, expected {most_blocks}")
    for rid, prompt in PROMPTS.items():
        sequence = prompt + tokens[rid]
        with torch.no_grad():
            hf_logprobs = hf.cpu()(torch.tensor([sequence])).logits[0].float().log_softmax(-1)
        assert len(tokens[rid]) == MAX_TOKENS
        for step, (token, got) in enumerate(zip(tokens[rid], logprobs[rid])):
            want = hf_logprobs[len(prompt) - 1 + step]  # [vocab]
            assert token == got.token_id and float(want.max() - want[token]) < tol, f"{rid} step {step}: not greedy"
            for top_id, top_logprob in got.top:
                assert abs(top_logprob - float(want[top_id])) < tol, f"{rid} step {step}, token {top_id}"


@pytest.mark.parametrize("name", list(MODELS))
def test_hybrid_groups_match_transformers_through_preemption(tmp_path, name):
    hf = write_checkpoint(tmp_path, name)
    check_hybrid_engine(make_engine(tmp_path), hf)


def test_the_windowed_group_changes_the_output(tmp_path):
    """The comparison above can fail: the same engine with the window dropped from the windowed layers
    (so they read every block, and nothing is freed) samples other tokens or logprobs."""
    hf = write_checkpoint(tmp_path, "gemma2")
    hf.config.sliding_window = 10_000
    engine = make_engine(tmp_path)
    prompt = [(3 * j) % 300 + 3 for j in range(30)]
    tokens, logprobs, _, _ = run(engine, {"r": prompt})
    with torch.no_grad():
        hf_logprobs = hf(torch.tensor([prompt + tokens["r"]])).logits[0].float().log_softmax(-1)
    gaps = [abs(got.logprob - float(hf_logprobs[len(prompt) - 1 + i][got.token_id]))
            for i, got in enumerate(logprobs["r"])]
    assert max(gaps) > 10 * LOGPROB_TOL
