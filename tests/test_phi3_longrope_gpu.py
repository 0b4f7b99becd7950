"""A tiny LongRoPE Phi-3 through the CUDA path (triton_fused.rotary_, or the fused rotary + KV store of
triton_attention.rotary_store_kv) agrees with its CPU reference path (GPU only): both read the one
cos/sin table of layers/rotary.py, built from the chosen factor list and scaled by the attention factor.
With both lists (served context 32 or 128, original 32), at Phi-3-mini's head_dim 96, and with
Phi-4-mini's partial rotary (96 of 128 dims; the table's other columns cos 1, sin 0)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fitserve.arch_config import ArchConfig
from fitserve.longrope import LongRopeScaling
from fitserve.models.phi3 import Phi3ForCausalLM
from paged_helpers import PagedDriver

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

ORIGINAL_TOKENS = 32
SHORT_STEPS = ([("a", list(range(1, 21))), ("b", list(range(50, 57)))], [("a", [5]), ("b", list(range(60, 70)))],
               [("a", [6]), ("b", [7])])  # prefill, mixed, decode: positions below 32
LONG_STEPS = ([("a", list(range(1, 49))), ("b", list(range(50, 57)))], [("a", [5]), ("b", list(range(60, 100)))],
              [("a", [6]), ("b", [7])])  # crosses 32 and reaches 50


def _pair(head_dim: int, rotary_dim: int | None, max_model_len: int, fused: bool):
    rng = random.Random(head_dim)
    num_factors = (rotary_dim or head_dim) // 2
    scaling = LongRopeScaling(short_factor=tuple(rng.uniform(1, 4) for _ in range(num_factors)),
                              long_factor=tuple(rng.uniform(1, 4) for _ in range(num_factors)),
                              original_max_position_embeddings=ORIGINAL_TOKENS,
                              attention_factor=math.sqrt(1 + math.log(4) / math.log(ORIGINAL_TOKENS)),
                              served_context_tokens=128)
    arch = ArchConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim, tie_word_embeddings=True,
                      max_position_embeddings=128, rope_scaling=scaling, rotary_dim=rotary_dim,
                      architecture="Phi3ForCausalLM").served_at(max_model_len)
    torch.manual_seed(0)
    cpu_model = Phi3ForCausalLM(arch, torch.float32, torch.device("cpu"))
    weights = {n: torch.randn(s) * (0.3 if n.endswith("norm.weight") else 0.05) + n.endswith("norm.weight")
               for n, s in cpu_model.checkpoint_tensor_shapes().items()}
    gpu_model = Phi3ForCausalLM(arch, torch.float32, torch.device("cuda"), fuse_rotary_store=fused)
    for model in (cpu_model, gpu_model):
        model.load_weights((n, t.to(model.device)) for n, t in weights.items())
    return cpu_model, gpu_model


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("head_dim, rotary_dim", [(64, None), (96, None), (128, 96)])  # Phi-3-mini; Phi-4-mini
@pytest.mark.parametrize("max_model_len", [ORIGINAL_TOKENS, 128])
def test_longrope_phi3_on_gpu_matches_cpu_reference_path(head_dim, rotary_dim, max_model_len, fused):
    cpu_model, gpu_model = _pair(head_dim, rotary_dim, max_model_len, fused)
    torch.testing.assert_close(gpu_model.layers[0].self_attn.attn.rotary.cos.cpu(),
                               cpu_model.layers[0].self_attn.attn.rotary.cos, rtol=1e-6, atol=1e-6)
    cpu_driver = PagedDriver(cpu_model, num_blocks=16, block_size=16)
    gpu_driver = PagedDriver(gpu_model, num_blocks=16, block_size=16, device="cuda")
    for step in (SHORT_STEPS if max_model_len == ORIGINAL_TOKENS else LONG_STEPS):
        # float32 in, but the kernels' tl.dot rounds to tf32 (tests/test_models_gpu.py: 2.4e-3 seen on the H200)
        torch.testing.assert_close(gpu_driver.step(step).cpu(), cpu_driver.step(step), atol=5e-3, rtol=5e-3)
