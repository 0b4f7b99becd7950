"""Qwen2, Qwen3 and Phi-3 through the Triton kernels agree with their pure-torch path (GPU only):
Qwen2's biases added after the linear layer, Qwen3's q/k norms before the fused rotary + KV store,
in float32 and, for the biases, under an fp8 weight format; a Llama with a 24-token sliding window; Phi-3
also at Phi-3-mini's head_dim 96, which the kernels pad to 128."""

from __future__ import annotations

import pytest
import torch

from fitserve.arch_config import ArchConfig
from fitserve.models.llama import LlamaForCausalLM
from fitserve.models.phi3 import Phi3ForCausalLM
from fitserve.models.qwen2 import Qwen2ForCausalLM
from fitserve.models.qwen3 import Qwen3ForCausalLM
from paged_helpers import PagedDriver

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

MODELS = {"qwen2": (Qwen2ForCausalLM, dict(qkv_bias=True)), "qwen3": (Qwen3ForCausalLM, dict(qk_norm=True)),
          "phi3": (Phi3ForCausalLM, {}),
          "mistral_window": (LlamaForCausalLM, dict(sliding_window=24))}  # shorter than the 39-token prompt
STEPS = ([("a", list(range(1, 40))), ("b", list(range(50, 57)))], [("a", [5]), ("b", list(range(60, 90)))],
         [("a", [6]), ("b", [7])], [("a", [8]), ("b", [9])])  # prefill, mixed, decodes


def _pair(name: str, quantization: str | None, head_dim: int = 64, **build):
    model_class, features = MODELS[name]
    arch = ArchConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim, tie_word_embeddings=True,
                      architecture=model_class.__name__, **features)
    torch.manual_seed(0)
    cpu_model = model_class(arch, torch.float32, torch.device("cpu"))
    weights = {n: torch.randn(s) * (0.3 if n.endswith("norm.weight") else 0.05) + n.endswith("norm.weight")
               for n, s in cpu_model.checkpoint_tensor_shapes().items()}
    cpu_model = model_class(arch, torch.float32, torch.device("cpu"), quantization=quantization)
    gpu_model = model_class(arch, torch.float32, torch.device("cuda"), quantization=quantization, **build)
    for model in (cpu_model, gpu_model):
        model.load_weights((n, t.to(model.device)) for n, t in weights.items())
        for module in model.modules():
            if hasattr(module, "finish_loading"):
                module.finish_loading()
    return cpu_model, gpu_model


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_on_gpu_matches_cpu_reference_path(name, fused):
    cpu_model, gpu_model = _pair(name, None, fuse_rotary_store=fused)
    cpu_driver = PagedDriver(cpu_model, num_blocks=16, block_size=16)
    gpu_driver = PagedDriver(gpu_model, num_blocks=16, block_size=16, device="cuda")
    for step in STEPS:
        # float32 in, but the kernels' tl.dot rounds to tf32: one logit in 600 lands 2.4e-3 off on the H200
        torch.testing.assert_close(gpu_driver.step(step).cpu(), cpu_driver.step(step), atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("fused", [True, False])
def test_phi3_mini_head_dim_96_on_gpu_matches_cpu_reference_path(fused):
    cpu_model, gpu_model = _pair("phi3", None, head_dim=96, fuse_rotary_store=fused)
    cpu_driver = PagedDriver(cpu_model, num_blocks=16, block_size=16)
    gpu_driver = PagedDriver(gpu_model, num_blocks=16, block_size=16, device="cuda")
    for step in STEPS:
        torch.testing.assert_close(gpu_driver.step(step).cpu(), cpu_driver.step(step), atol=5e-3, rtol=5e-3)


def test_qwen2_biases_under_fp8_weights_match_the_cpu_path():
    cpu_model, gpu_model = _pair("qwen2", "fp8")
    cpu_driver = PagedDriver(cpu_model, num_blocks=16, block_size=16)
    gpu_driver = PagedDriver(gpu_model, num_blocks=16, block_size=16, device="cuda")
    for step in STEPS:
        got, expected = gpu_driver.step(step).cpu(), cpu_driver.step(step)
        # fused per-token quantization and the GPU GEMMs round differently from the reference: on these
        # weights Llama itself (no biases) is 5.1-7.0% off in relative norm on the H200, Qwen2 4.5-6.1%
        assert ((got - expected).norm() / expected.norm()).item() < 0.1
