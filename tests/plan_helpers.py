"""Tiny model folders and plan inputs for the planner and start-up tests."""

from __future__ import annotations

import json
from pathlib import Path

from fitserve.arch_config import ArchConfig
from fitserve.plan.planner import PlanInputs
from fitserve.plan.shapes import counts_from_arch

LLAMA_3_8B = Path(__file__).resolve().parents[1] / "configs" / "llama-3-8b-instruct"
RTX_4000_ADA_BYTES = 20475 * 2**20  # the guide's card, as nvidia-smi reports it
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "eos_token_id": 2,
}


def write_model_folder(folder: Path, **overrides: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**TINY_CONFIG, **overrides}))
    return folder


def llama_8b_arch() -> ArchConfig:
    return ArchConfig.from_hf_config(json.loads((LLAMA_3_8B / "config.json").read_text()))


def llama_8b_inputs(utilization: float = 0.9, **fields: object) -> PlanInputs:
    """Llama-3-8B-Instruct on the guide's 20 GB card."""
    arch = llama_8b_arch()
    values = dict(arch=arch, model_name="Llama-3-8B-Instruct", param_counts=counts_from_arch(arch), max_model_len=8192,
                  device_total_bytes=RTX_4000_ADA_BYTES, gpu_name="RTX 4000 Ada", gpu_memory_utilization=utilization)
    values.update(fields)
    return PlanInputs(**values)  # type: ignore[arg-type]
