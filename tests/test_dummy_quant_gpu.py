"""Dummy packed weights on the GPU (GPU only): Llama-3-8B's shapes (4 of its layers) in each packed
layout, planned to the byte, finite through the Triton kernels, and the kernels equal to the layers'
own dequantized weights, as check-quant measures them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from paged_helpers import PagedDriver  # noqa: E402

from fitserve import startup  # noqa: E402
from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from fitserve.models.loader import load_model  # noqa: E402
from fitserve.quantcheck.check import dequantize_packed_layers  # noqa: E402
from fitserve.sampling_params import SamplingParams  # noqa: E402
from fitserve.weights.source import resolve_model_source  # noqa: E402

LLAMA_3_8B = Path(__file__).resolve().parents[1] / "configs" / "llama-3-8b-instruct"
PACKED = ("gptq", "awq", "compressed-tensors", "gguf")
CUDA = torch.device("cuda")


def four_layer_llama_8b(folder: Path) -> Path:
    config = json.loads((LLAMA_3_8B / "config.json").read_text())
    config["num_hidden_layers"] = 4  # layer 3 is a Q6_K one of 4 (the last eighth): both GGUF types appear
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("quantization", PACKED)
def test_a_dummy_engine_plans_its_bytes_and_generates(tmp_path, quantization):
    folder = four_layer_llama_8b(tmp_path / "m")
    # the KV cache sized by --gpu-memory-utilization: start-up measures the weights only then (a fixed cache
    # size skips the measurement)
    config = EngineConfig(model=str(folder), load_format="dummy", quantization=quantization, device="cuda",
                          enforce_eager=True, cache=CacheConfig(gpu_memory_utilization=0.3),
                          scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=4))
    built = startup.build_engine(config, progress=False)
    model = built.engine.runner.model
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert built.memory.planned.weights.total_bytes == held
    assert abs(built.memory.weights_bytes - held) < 0.005 * held  # measured after loading (allocator rounding)
    engine = built.engine
    engine.add_request(engine.make_request("r", list(range(1, 40)), SamplingParams(max_tokens=8, temperature=0,
                                                                                   ignore_eos=True)))
    tokens = []
    while engine.has_unfinished:
        for out in engine.step():
            tokens += out.new_token_ids
    assert len(tokens) == 8


@pytest.mark.parametrize("quantization", PACKED)
def test_the_kernels_equal_the_dummy_layers_dequantized(tmp_path, quantization):
    folder = four_layer_llama_8b(tmp_path / "m")
    source = resolve_model_source(EngineConfig(model=str(folder), load_format="dummy", quantization=quantization))
    model = load_model(source, torch.bfloat16, CUDA, progress=False, quantization=quantization)
    prompts = {"a": list(range(1, 300)), "b": [7, 8, 9]}  # a prefill past the decode kernels' rows, then decode
    packed = [PagedDriver(model, num_blocks=128, block_size=16, device="cuda").step(list(prompts.items()))]
    assert torch.isfinite(packed[0]).all()
    assert dequantize_packed_layers(model) == 4 * 4
    dense = PagedDriver(model, num_blocks=128, block_size=16, device="cuda").step(list(prompts.items()))
    err = ((packed[0] - dense).norm() / dense.norm()).item()
    assert err < 2e-2, err
