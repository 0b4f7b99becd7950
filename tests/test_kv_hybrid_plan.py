"""The plan of a model mixing windowed and full layers (Gemma 2/3): a block holds one KV cache group's
layers, a request's windowed groups hold their window, and start-up allocates what the plan says."""

from __future__ import annotations

from dataclasses import replace

from fitserve.arch_config import ArchConfig
from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig
from fitserve.llm import build_engine
from fitserve.plan.planner import PlanInputs, plan_memory
from fitserve.plan.report import format_plan, plan_to_json
from fitserve.plan.shapes import counts_from_arch, kv_bytes_per_token

GIB = 2**30
GEMMA3_4B = ArchConfig.from_hf_config({  # google/gemma-3-4b-it's text config: 5 global layers of 34, window 1024
    "architectures": ["Gemma3ForConditionalGeneration"], "eos_token_id": [1, 106],
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024, "max_position_embeddings": 131072}})


def gemma3_plan(arch: ArchConfig = GEMMA3_4B, max_model_len: int = 32768):
    return plan_memory(PlanInputs(arch=arch, model_name="gemma-3-4b", param_counts=counts_from_arch(arch),
                                  max_model_len=max_model_len, device_total_bytes=24 * GIB, gpu_name="24 GiB card",
                                  gpu_memory_utilization=0.9))


def test_gemma3_at_32k_holds_several_times_the_requests_of_a_whole_context_cache():
    hybrid = gemma3_plan()
    whole = gemma3_plan(replace(GEMMA3_4B, sliding_window=None))  # every layer caches the whole context
    assert hybrid.inputs.kv_windows == (None,) + (1024,) * 6 and whole.inputs.kv_windows == (None,)
    assert hybrid.kv_block_bytes * 34 == whole.kv_block_bytes * 5  # a block holds 5 layers, not 34
    # (2048 + 6 x 65) blocks of 5 layers against 2048 of 34: 17.5% of the bytes
    assert hybrid.kv_bytes_per_token == (2048 + 6 * 65) * hybrid.kv_block_bytes // 32768
    assert hybrid.kv_bytes_per_token < 0.18 * kv_bytes_per_token(GEMMA3_4B, "bfloat16")
    assert whole.requests_at(32768) >= 1 and hybrid.requests_at(32768) >= 5 * whole.requests_at(32768)
    text = " ".join(format_plan(hybrid).split())
    assert "29 of 34 layers attend over a sliding window of 1,024 tokens: 7 KV cache groups of up to 5" in text
    assert "holds at most 65 blocks per request, so a request at 32,768 tokens holds 82% fewer KV bytes" in text
    assert plan_to_json(hybrid)["concurrency"]["32768"] == min(hybrid.requests_at(32768), 256)


def test_a_longer_context_than_the_cache_names_the_longest_that_fits():
    plan = gemma3_plan(max_model_len=131072)
    tiny = plan_memory(replace(plan.inputs, device_total_bytes=None, kv_cache_memory_bytes=200 * plan.kv_block_bytes))
    problem = next(p for p in tiny.problems if p.kind == "max_model_len")
    longest = tiny.max_request_tokens
    assert longest < 200 * 16 and f"Set --max-model-len {longest} or less" in problem.message
    # shorter than the windows plus a chunk: each of the 7 groups holds all of its blocks
    assert longest % 16 == 0 and 7 * (longest // 16) <= 200 < 7 * (longest // 16 + 1)


def test_start_up_allocates_the_planned_blocks_of_a_hybrid_model(tmp_path):
    from test_kv_hybrid_models import write_checkpoint
    write_checkpoint(tmp_path, "gemma3")  # 4 layers: 1 full, 3 windowed: 4 groups of 1 layer
    config = EngineConfig(model=str(tmp_path), device="cpu", dtype="float32",
                          cache=CacheConfig(kv_cache_memory_bytes=2**20, block_size=4),
                          scheduler=SchedulerConfig(max_model_len=128))
    built = build_engine(config, progress=False)
    planned = built.memory.planned
    caches = {id(t): t for pair in built.engine.runner.kv_caches for t in pair}
    assert len(caches) == 2, "one (K, V) pair shared by the layers at one position of their groups"
    assert built.engine.kv_cache.pool.num_blocks == planned.num_kv_blocks == 2**20 // planned.kv_block_bytes
    assert planned.kv_block_bytes * planned.num_kv_blocks == sum(t.nbytes for t in caches.values())
    assert built.engine.kv_cache.group_windows == (None, 8, 8, 8)
