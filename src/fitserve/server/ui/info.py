"""What the page shows besides the live metrics: the model, its settings and the memory plan.

`startup_info` is called once by the composition root (`fitserve serve`, cli.py) with the
start-up memory record (runner/memory.py `StartupMemory`, read here only through its plan
and `to_json()`, so this module stays torch-free) and the engine config; the result is
kept on the engine as `startup_info` and served by GET /ui/api/info through `ui_info`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fitserve.config import EngineConfig
from fitserve.engine.client import EngineClient

PROC_STATUS = Path("/proc/self/status")  # Linux: VmRSS is the process's resident memory
KIB = 1024

# (key in StartupMemory.to_json()'s "planned"/"measured", label, what "actual" means on a GPU)
MEMORY_ROWS = (
    ("weights_bytes", "weights", "measured after loading"),
    ("activation_peak_bytes", "activation peak", "measured by the profiling forward and sampler"),
    ("runtime_non_torch_bytes", "runtime outside torch", "growth of non-torch memory while loading"),
    ("cuda_graph_bytes", "CUDA-graph pool", "measured after capture"),
    ("kv_cache_bytes", "KV cache", "allocated"),
)


def _memory_table(memory: Any) -> dict[str, Any]:
    """Planned vs actual, in bytes; actual is None where start-up did not measure it (the CPU)."""
    record = memory.to_json()
    planned, measured = record["planned"], record["measured"]
    plan = memory.planned
    rows = [{"name": label, "planned_bytes": planned[key], "actual_bytes": measured.get(key), "actual_is": how}
            for key, label, how in MEMORY_ROWS]
    start, end = record.get("start"), record.get("end")
    if plan.inputs.on_gpu:
        outside_actual = None if start is None else start["total_bytes"] - start["free_bytes"]
        rows.append({"name": "outside the budget (CUDA context, other processes)",
                     "planned_bytes": planned["outside_budget_bytes"], "actual_bytes": outside_actual,
                     "actual_is": "in use on the card before start-up"})
    used_after = None
    if start is not None and end is not None:
        used_after = (end["total_bytes"] - end["free_bytes"]) - (start["total_bytes"] - start["free_bytes"])
    planned_total = sum(row["planned_bytes"] or 0 for row in rows[: len(MEMORY_ROWS)])
    return {
        "on_gpu": plan.inputs.on_gpu,
        "gpu_name": plan.inputs.gpu_name,
        "device_total_bytes": plan.inputs.device_total_bytes,
        "budget_bytes": record["budget_bytes"],
        "rows": rows,
        "kv_blocks": {"planned": planned["num_kv_blocks"], "actual": measured["num_kv_blocks"]},
        "kv_tokens": {"planned": planned["num_kv_blocks"] * plan.inputs.block_size,
                      "actual": measured["num_kv_blocks"] * plan.inputs.block_size},
        "kv_dtype": plan.kv_dtype,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "planned_total_bytes": planned_total,
        "used_after_startup_bytes": used_after,
        "free_after_startup_bytes": None if end is None else end["free_bytes"],
        "warnings": [p.message for p in plan.problems if not p.fatal],
    }


def startup_info(memory: Any | None, config: EngineConfig) -> dict[str, Any]:
    """The settings the engine runs with and its memory plan (`memory`: a StartupMemory or None)."""
    plan = None if memory is None else memory.planned
    settings: dict[str, Any] = {
        "model": config.model or "embedded SmolLM2-135M-Instruct",
        "device": ("cuda" if plan.inputs.on_gpu else "cpu") if plan is not None else config.device,
        "dtype": plan.inputs.dtype if plan is not None else config.dtype,
        "quantization": plan.inputs.quantization if plan is not None else config.quantization,  # an fp8 checkpoint's own
        "kv_cache_dtype": config.cache.kv_cache_dtype,
        "max_model_len": plan.inputs.max_model_len if plan is not None else config.scheduler.max_model_len,
        "max_num_seqs": config.scheduler.max_num_seqs,
        "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
        "block_size": config.cache.block_size,
        "gpu_memory_utilization": config.cache.gpu_memory_utilization,
        "kv_cache_memory_bytes": config.cache.kv_cache_memory_bytes,
        "num_gpu_blocks_override": config.cache.num_gpu_blocks_override,
        "enable_prefix_caching": config.cache.enable_prefix_caching,
        "enforce_eager": config.enforce_eager,
        "seed": config.seed,
    }
    return {"settings": settings, "memory": None if memory is None else _memory_table(memory)}


def resident_memory_bytes() -> int | None:
    """This process's resident memory now (Linux), else None."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KIB
    except (OSError, ValueError, IndexError):
        return None
    return None


def ui_info(engine: EngineClient | None, phase: str, version: str) -> dict[str, Any]:
    """GET /ui/api/info: the model, its settings, the memory plan; `model` is None until loaded."""
    info: dict[str, Any] = {"phase": phase, "version": version, "model": None, "settings": {}, "memory": None,
                            "engine": {}, "process_resident_bytes": resident_memory_bytes()}
    if engine is None:
        return info
    stats = engine.stats()
    info["model"] = engine.model_name
    info["engine"] = {
        "max_model_len": engine.max_model_len,
        "max_num_seqs": stats.max_num_seqs or None,
        "block_size": stats.block_size_tokens or None,
        "num_kv_blocks": stats.num_kv_blocks or None,
        "kv_capacity_tokens": stats.kv_capacity_tokens or None,
    }
    startup = engine.startup_info  # None where whoever built the engine recorded none (tests' fakes)
    if startup is not None:
        info["settings"] = dict(startup.get("settings") or {})
        info["memory"] = startup.get("memory")
    return info
