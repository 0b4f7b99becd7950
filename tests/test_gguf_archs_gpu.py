"""The tiny Q8_0 GGUF files of Phi-3, Gemma 2, Mixtral and Qwen3-MoE (tests/test_gguf_*.py) on CUDA with
their projections kept packed (--quantization gguf: the Triton kernels, Phi-3's fused rows cut whole;
experts dequantized) against the CPU model dequantized at load, float32 (GPU only)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from paged_helpers import PagedDriver  # noqa: E402
from test_gguf_gemma2 import tiny_gemma2, write_gemma2_file  # noqa: E402
from test_gguf_mistral import tiny_mixtral, write_llama_file  # noqa: E402
from test_gguf_phi3 import tiny_phi3, write_phi3_file  # noqa: E402
from test_gguf_qwen3moe import tiny_qwen3moe, write_qwen3moe_file  # noqa: E402

from fitserve.config import EngineConfig  # noqa: E402
from fitserve.layers.formats.gguf import GgufLinear  # noqa: E402
from fitserve.models.loader import load_model  # noqa: E402
from fitserve.weights.source import resolve_model_source  # noqa: E402

PROMPTS = [("a", [5, 17, 81, 44, 9, 50, 3]), ("b", list(range(3, 60, 3)))]
RELATIVE_TOL = 2e-2  # bf16 activations through the packed kernels against float32 on the CPU
WRITERS = {
    "phi3": lambda path: write_phi3_file(path, tiny_phi3(), quantized=True),
    "gemma2": lambda path: write_gemma2_file(path, tiny_gemma2(), quantized=True),
    "mixtral": lambda path: write_llama_file(path, tiny_mixtral(), "tiny-mixtral", num_experts=4, quantized=True),
    "qwen3moe": lambda path: write_qwen3moe_file(path, tiny_qwen3moe(), quantized=True),
}


@pytest.mark.parametrize("arch", list(WRITERS))
def test_packed_on_cuda_matches_the_cpu_dequantized_model(tmp_path, arch):
    path = tmp_path / f"tiny-{arch}-q8.gguf"
    WRITERS[arch](path)
    source = resolve_model_source(EngineConfig(model=str(path)))
    cpu = load_model(source, torch.float32, torch.device("cpu"), progress=False)
    expected = PagedDriver(cpu, num_blocks=16, block_size=16).step(PROMPTS)
    gpu = load_model(source, torch.bfloat16, torch.device("cuda"), progress=False, quantization="gguf")
    assert any(isinstance(m, GgufLinear) for m in gpu.modules())
    got = PagedDriver(gpu, num_blocks=16, block_size=16, device="cuda").step(PROMPTS).float().cpu()
    assert ((got - expected).norm() / expected.norm()).item() < RELATIVE_TOL
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
