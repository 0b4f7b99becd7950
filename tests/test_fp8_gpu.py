"""FP8 on the GPU: the Triton quantization and GEMM against the pure-torch reference, torch._scaled_mm's
forms, Fp8Linear and whole models against the CPU path, CUDA graphs, and load-time memory (GPU only)."""

from __future__ import annotations

import pytest
import torch

from fitserve.kernels import fp8

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from fitserve.kernels import triton_fp8, triton_fp8_small  # noqa: E402  (imports triton, present with CUDA torch)
from fitserve.layers.formats import fp8 as quantization  # noqa: E402
from fitserve.layers.formats.registry import make_linear  # noqa: E402

CUDA = torch.device("cuda")


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("num_rows,num_cols", [(1, 4096), (37, 576), (300, 14336), (5, 100), (2, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_per_token_quantization_is_bit_exact(num_rows, num_cols, dtype):
    x = (torch.randn(num_rows, num_cols, device=CUDA) * 3).to(dtype)
    x[0, 0] = 0.0
    if num_rows > 1:
        x[1] = 0.0  # an all-zero row gets the minimum scale
    q, scale = triton_fp8.quantize_per_token(x)
    ref_q, ref_scale = fp8.quantize_per_row(x)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("num_rows", [1, 7, 16, 33, 64, 65, 300])
@pytest.mark.parametrize("num_cols,inner", [(960, 576), (4096, 4096), (512, 1536)])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_triton_scaled_mm_matches_reference(num_rows, num_cols, inner, per_tensor):
    x = torch.randn(num_rows, inner, device=CUDA).to(torch.bfloat16)
    w = (torch.randn(num_cols, inner, device=CUDA) * 0.02).to(torch.bfloat16)
    if per_tensor:
        qx, sx = fp8.quantize_per_tensor(x)
        qw, sw = fp8.quantize_per_tensor(w)
    else:
        qx, sx = fp8.quantize_per_row(x)
        qw, sw = fp8.quantize_per_row(w)
        sw = sw.reshape(1, -1).contiguous()
    expected = fp8.scaled_mm_reference(qx, sx, qw, sw, torch.float32)
    got32 = triton_fp8.scaled_mm(qx, sx, qw, sw, torch.float32)
    # Up to 16 rows (mma.sync) only the summation order differs; larger tiles run Hopper's wgmma,
    # whose fp8 accumulation Triton leaves in the tensor cores' reduced precision (about 1e-3).
    assert rel_err(got32, expected) < (1e-5 if num_rows <= 16 else 3e-3)
    got = triton_fp8.scaled_mm(qx, sx, qw, sw, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and rel_err(got, expected) < 1e-2


def _quantized(num_rows: int, num_cols: int, inner: int, per_tensor: bool):
    x = torch.randn(num_rows, inner, device=CUDA).to(torch.bfloat16)
    w = (torch.randn(num_cols, inner, device=CUDA) * 0.02).to(torch.bfloat16)
    if per_tensor:
        return (*fp8.quantize_per_tensor(x), *fp8.quantize_per_tensor(w))
    (qx, sx), (qw, sw) = fp8.quantize_per_row(x), fp8.quantize_per_row(w)
    return qx, sx, qw, sw.reshape(1, -1).contiguous()


SPLIT_CONFIGS = [triton_fp8_small.SplitKConfig(16, 64, 128, 1), triton_fp8_small.SplitKConfig(16, 32, 256, 4),
                 triton_fp8_small.SplitKConfig(32, 128, 128, 5, num_warps=8),  # uneven: 12 K blocks in 5 splits
                 triton_fp8_small.SplitKConfig(32, 64, 64, 16, num_stages=3)]


@pytest.mark.parametrize("shape", [(1, 4096), (37, 576), (300, 14336)])
def test_static_quantization_is_bit_exact(shape):
    x = (torch.randn(shape, device=CUDA) * 3).to(torch.bfloat16)
    scale = torch.tensor(2.5 / fp8.FP8_MAX, device=CUDA)  # values past +-2.5 saturate
    expected = fp8.quantize(x, scale)
    got = triton_fp8.quantize_static(x, scale)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    assert got.float().abs().max().item() == fp8.FP8_MAX


@pytest.mark.parametrize("num_rows", [1, 3, 17, 32])
@pytest.mark.parametrize("num_cols,inner", [(1000, 1536), (4096, 1536), (200, 3072)])  # N partial tiles
@pytest.mark.parametrize("cfg", SPLIT_CONFIGS, ids=str)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_split_k_scaled_mm_matches_reference(num_rows, num_cols, inner, cfg, per_tensor):
    qx, sx, qw, sw = _quantized(num_rows, num_cols, inner, per_tensor)
    expected = fp8.scaled_mm_reference(qx, sx, qw, sw, torch.float32)
    # BLOCK_M <= 32 stays on mma.sync: exact float32 sums, only their order differs.
    assert rel_err(triton_fp8_small.scaled_mm_split_k(qx, sx, qw, sw, torch.float32, cfg), expected) < 1e-5
    for dtype in (torch.bfloat16, torch.float16):
        got = triton_fp8_small.scaled_mm_split_k(qx, sx, qw, sw, dtype, cfg)
        assert got.dtype == dtype and rel_err(got, expected) < 1e-2


def test_split_k_needs_k_in_whole_blocks():
    qx, sx, qw, sw = _quantized(4, 256, 4112, False)  # K a multiple of 16, not of 256
    with pytest.raises(AssertionError, match="BLOCK_K"):
        triton_fp8_small.scaled_mm_split_k(qx, sx, qw, sw, torch.bfloat16, triton_fp8_small.SplitKConfig(16, 64, 256, 2))


@pytest.mark.parametrize("num_cols,inner", [(1000, 576), (4096, 4096), (37, 14336), (300, 1000)])
@pytest.mark.parametrize("cfg", [triton_fp8_small.GemvConfig(8, 2048, 8), triton_fp8_small.GemvConfig(4, 256, 4)],
                         ids=str)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_fp8_gemv_matches_reference(num_cols, inner, cfg, per_tensor):
    qx, sx, qw, sw = _quantized(1, num_cols, inner, per_tensor)
    expected = fp8.scaled_mm_reference(qx, sx, qw, sw, torch.float32)
    assert rel_err(triton_fp8_small.gemv(qx, sx, qw, sw, torch.float32, cfg), expected) < 1e-5
    for dtype in (torch.bfloat16, torch.float16):
        got = triton_fp8_small.gemv(qx, sx, qw, sw, dtype, cfg)
        assert got.shape == (1, num_cols) and got.dtype == dtype and rel_err(got, expected) < 1e-2


SWAP_AB_CONFIGS = [triton_fp8_small.SwapABConfig(64, 32, 128, 4), triton_fp8_small.SwapABConfig(64, 32, 128, 1),
                   triton_fp8_small.SwapABConfig(128, 16, 64, 5, num_stages=3),  # uneven: 16 K blocks in 5 splits
                   triton_fp8_small.SwapABConfig(64, 32, 32, 3, promote_every=32)]


@pytest.mark.parametrize("num_rows,cfg", [(rows, cfg) for cfg in SWAP_AB_CONFIGS for rows in (1, 2, 7, 16, 24, 32)
                                          if rows <= cfg.block_t], ids=str)
@pytest.mark.parametrize("num_cols,inner", [(6144, 4096), (4096, 14336), (1000, 1024), (48, 1024)])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_swap_ab_scaled_mm_matches_reference(num_rows, cfg, num_cols, inner, per_tensor):
    """Sums promoted to float32 every 32 products: close to the exact reference (fast accumulation,
    as torch's row-wise _scaled_mm runs past 32 rows, is about 1e-3 off)."""
    qx, sx, qw, sw = _quantized(num_rows, num_cols, inner, per_tensor)
    expected = fp8.scaled_mm_reference(qx, sx, qw, sw, torch.float32)
    assert rel_err(triton_fp8_small.scaled_mm_swap_ab(qx, sx, qw, sw, torch.float32, cfg), expected) < 2e-4
    got = triton_fp8_small.scaled_mm_swap_ab(qx, sx, qw, sw, torch.bfloat16, cfg)
    assert got.shape == (num_rows, num_cols) and got.dtype == torch.bfloat16 and rel_err(got, expected) < 1e-2


@pytest.mark.parametrize("num_rows,kernel,cfg", [(20, "split_k", triton_fp8_small.SplitKConfig(32, 64, 128, 4)),
                                                 (20, "swap_ab", triton_fp8_small.SwapABConfig(64, 32, 128, 4)),
                                                 (1, "gemv", triton_fp8_small.GemvConfig(8, 2048, 8))], ids=str)
def test_small_m_kernels_are_deterministic_and_replay_in_a_cuda_graph(num_rows, kernel, cfg):
    qx, sx, qw, sw = _quantized(num_rows, 4096, 4096, False)
    choice = triton_fp8_small.SmallMChoice(32, kernel, cfg, False)
    eager = triton_fp8_small.run(choice, qx, sx, qw, sw, torch.bfloat16)
    for _ in range(3):
        assert torch.equal(triton_fp8_small.run(choice, qx, sx, qw, sw, torch.bfloat16).view(torch.int16),
                           eager.view(torch.int16))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture wants
        triton_fp8_small.run(choice, qx, sx, qw, sw, torch.bfloat16)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = triton_fp8_small.run(choice, qx, sx, qw, sw, torch.bfloat16)
    new_qx, new_sx, _, _ = _quantized(num_rows, 4096, 4096, False)
    qx.copy_(new_qx)
    sx.copy_(new_sx)
    graph.replay()
    expected = triton_fp8_small.run(choice, new_qx, new_sx, qw, sw, torch.bfloat16)
    assert torch.equal(static_out.view(torch.int16), expected.view(torch.int16))


def test_small_m_plan():
    """The table's rules: GEMV at one row, swap-AB up to 32 rows, split over K only where its tiles
    underfill the SMs, a BLOCK_K that divides K."""
    plan = triton_fp8_small.plan
    assert plan(1, 28672, 4096, 132).kernel == "gemv"
    down = plan(20, 4096, 14336, 132)
    assert down.kernel == "swap_ab" and down.config.split_k > 1 and 14336 % down.config.block_k == 0
    gate_up = plan(16, 28672, 4096, 132)
    assert gate_up.kernel == "swap_ab" and gate_up.config.split_k == 1, "gate_up's tiles fill the chip"
    assert plan(33, 4096, 4096, 132) is None
    small_k = plan(4, 960, 576, 132)
    assert small_k is not None and 576 % small_k.config.block_k == 0


def test_scaled_mm_forms_on_this_torch():
    """Which torch._scaled_mm forms run here (printed for docs/quantization.md); per-tensor must."""
    forms = {(row_wise, dtype): quantization.scaled_mm_works(CUDA, row_wise, dtype)
             for row_wise in (True, False) for dtype in (torch.bfloat16, torch.float16)}
    print(f"torch {torch.__version__}: _scaled_mm forms {forms}")
    assert forms[(False, torch.bfloat16)]


@pytest.mark.parametrize("num_rows", [1, 20, 128, 2048])
def test_torch_scaled_mm_matches_reference_when_it_runs(num_rows):
    if not quantization.scaled_mm_works(CUDA, True, torch.bfloat16):
        pytest.skip("row-wise _scaled_mm does not run on this torch")
    x = torch.randn(num_rows, 4096, device=CUDA).to(torch.bfloat16)
    w = (torch.randn(6144, 4096, device=CUDA) * 0.02).to(torch.bfloat16)
    qx, sx = triton_fp8.quantize_per_token(x)
    qw, sw = fp8.quantize_per_row(w)
    sw = sw.reshape(1, -1).contiguous()
    got = fp8.scaled_mm_torch(qx, sx, qw, sw, torch.bfloat16)
    assert rel_err(got, fp8.scaled_mm_reference(qx, sx, qw, sw, torch.float32)) < 1e-2


@pytest.mark.parametrize("quant", ["fp8", "fp8_per_tensor"])
@pytest.mark.parametrize("num_rows", [1, 3, 20, 100])  # 1: fp8 GEMV; 3, 20: split-K (qkv's tiles underfill)
def test_fp8_linear_on_gpu_matches_the_cpu_path(quant, num_rows):
    torch.manual_seed(0)
    weight = (torch.randn(6144, 4096) * 0.02).to(torch.bfloat16)
    layers = {}
    for device in (torch.device("cpu"), CUDA):
        layer = make_linear(4096, (4096, 1024, 1024), torch.bfloat16, device, quant)
        for index, shard in enumerate(weight.split([4096, 1024, 1024])):
            layer.load_shard(index, shard)
        layers[device.type] = layer
    assert torch.equal(layers["cpu"].weight.view(torch.uint8), layers["cuda"].weight.cpu().view(torch.uint8))
    x = torch.randn(num_rows, 4096).to(torch.bfloat16)
    expected = layers["cpu"](x)
    got = layers["cuda"](x.to(CUDA)).cpu()
    assert rel_err(got, expected) < 1e-2
    assert rel_err(got, x.float() @ weight.float().t()) < 0.1, "close to the unquantized layer"


def _tiny_arch():
    from fitserve.arch_config import ArchConfig

    return ArchConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)


@pytest.mark.parametrize("quant", ["fp8", "fp8_per_tensor"])
def test_fp8_model_on_gpu_matches_cpu_reference_path(quant):
    """fp8 weights and an fp8 KV cache: Triton kernels and torch._scaled_mm agree with the pure-torch path."""
    from fitserve.models.llama import LlamaForCausalLM
    from paged_helpers import PagedDriver

    arch = _tiny_arch()
    torch.manual_seed(0)
    source = LlamaForCausalLM(arch, torch.float32, torch.device("cpu"))
    for p in source.parameters():
        p.data.normal_(0, 0.05)
    weights = [(f"model.{n}", p.data.clone()) for n, p in source.named_parameters()]
    drivers = []
    for device in ("cpu", "cuda"):
        model = LlamaForCausalLM(arch, torch.bfloat16, torch.device(device), quantization=quant)
        split = []
        for name, tensor in weights:  # the HF layout: separate q/k/v and gate/up tensors
            if "qkv_proj" in name:
                for part, t in zip(("q_proj", "k_proj", "v_proj"), tensor.split([256, 64, 64])):
                    split.append((name.replace("qkv_proj", part), t))
            elif "gate_up_proj" in name:
                for part, t in zip(("gate_proj", "up_proj"), tensor.split([512, 512])):
                    split.append((name.replace("gate_up_proj", part), t))
            else:
                split.append((name, tensor))
        model.load_weights(split)
        driver = PagedDriver(model, num_blocks=16, block_size=16, device=device)
        driver.caches = [(k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)) for k, v in driver.caches]
        model.bind_kv_cache(driver.caches)
        drivers.append(driver)
    chunks = [("a", list(range(1, 40))), ("b", list(range(50, 57)))]
    for step in (chunks, [("a", [5]), ("b", list(range(60, 90)))], [("a", [6]), ("b", [7])]):
        cpu_logits = drivers[0].step(step)
        gpu_logits = drivers[1].step(step).cpu()
        assert rel_err(gpu_logits, cpu_logits) < 3e-2


def graph_and_eager_tokens(quant: str, async_scheduling: bool = False) -> list[dict[str, list[int]]]:
    """A tiny random fp8 model's greedy tokens through the engine, with CUDA graphs then eagerly
    (benchmarks/fp8_graph_eager_check.py runs it under several small-batch tables)."""
    from fitserve.core.interfaces import KVCapacity
    from fitserve.core.scheduler import SchedulerLimits
    from fitserve.engine.llm_engine import EngineLimits, LLMEngine
    from fitserve.models.llama import LlamaForCausalLM
    from fitserve.runner.model_runner import TorchModelRunner
    from fitserve.testing import FakeDecoder
    from paged_helpers import engine_greedy_tokens

    arch = _tiny_arch()
    torch.manual_seed(0)
    model = LlamaForCausalLM(arch, torch.bfloat16, CUDA, quantization=quant)
    for module in model.modules():
        if isinstance(module, quantization.Fp8Linear):
            module.load_full(torch.randn(module.out_features, module.in_features) * 0.2)
    for name, p in model.named_parameters():
        if not name.endswith(("proj.weight", "proj.weight_scale")):
            p.data.normal_(0, 0.2)
    if quant == "fp8_per_tensor":
        from fitserve.runner.calibration import calibrate_fp8_activation_scales

        ids = [[(11 * i + j) % 300 for j in range(40)] for i in range(4)]
        assert calibrate_fp8_activation_scales(model, ids, CUDA) == 4 * arch.num_hidden_layers
    results = []
    for use_graphs in (True, False):
        runner = TorchModelRunner(model, arch, KVCapacity(64, 16), torch.float8_e4m3fn, CUDA, seed=0,
                                  max_num_seqs=12, max_model_len=256, use_cuda_graphs=use_graphs)
        engine = LLMEngine(runner, FakeDecoder(), EngineLimits(300, (), SchedulerLimits(12, 64, 256)),
                           async_scheduling=async_scheduling)
        results.append(engine_greedy_tokens(engine, 300))
    return results


@pytest.mark.parametrize("quant", ["fp8", "fp8_per_tensor"])  # per tensor: the static (calibrated) scales
def test_fp8_cuda_graph_decode_gives_the_eager_tokens(quant):
    graph_tokens, eager_tokens = graph_and_eager_tokens(quant)
    assert graph_tokens == eager_tokens


def test_programmatic_dependent_launch_changes_no_token(monkeypatch):
    """kernels/pdl.py only lets each kernel launch early and wait: with it off, graphs and eager
    decoding give the same tokens as with it on."""
    from fitserve.kernels import pdl

    if not pdl.supported(torch.cuda.current_device()):
        pytest.skip("no programmatic dependent launch before sm_90: nothing to compare")
    with_pdl = graph_and_eager_tokens("fp8")
    monkeypatch.setattr(pdl, "supported", lambda device_index: False)
    assert pdl.options(CUDA) == {"PDL": False, "launch_pdl": False}
    assert graph_and_eager_tokens("fp8") == with_pdl


def test_fp8_dummy_load_holds_one_projection_in_bf16_at_most():
    """Peak memory while loading an fp8 model: the fp8 weights, bf16 embeddings, and one projection's
    temporaries; never the bf16 model."""
    from fitserve.arch_config import ArchConfig
    from fitserve.models.loader import init_dummy
    from fitserve.models.llama import LlamaForCausalLM

    arch = ArchConfig(vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=128)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = LlamaForCausalLM(arch, torch.bfloat16, CUDA, quantization="fp8")
    init_dummy(model)
    torch.cuda.synchronize()
    final = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    linear_bf16 = sum(m.out_features * m.in_features * 2 for m in model.modules()
                      if isinstance(m, quantization.Fp8Linear))
    largest = max(m.out_features * m.in_features for m in model.modules() if isinstance(m, quantization.Fp8Linear))
    assert final < linear_bf16 * 0.6, "fp8 linear layers take about half the bf16 bytes"
    assert peak - final <= largest * (2 + 4 + 4 + 4), "one projection's bf16 copy and float32 temporaries at most"


@pytest.mark.parametrize("num_rows,hidden", [(1, 4096), (37, 576), (300, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_quant_is_rms_norm_then_quantize(num_rows, hidden, with_residual):
    from fitserve.kernels import triton_fused

    x = torch.randn(num_rows, hidden, device=CUDA).to(torch.bfloat16)
    residual = torch.randn_like(x) if with_residual else None
    weight = torch.randn(hidden, device=CUDA).to(torch.bfloat16)
    out, summed = triton_fused.rms_norm(x, weight, 1e-5, residual)
    q, scale, fused_sum = triton_fused.rms_norm_quant(x, weight, 1e-5, residual)
    ref_q, ref_scale = triton_fp8.quantize_per_token(out)
    assert torch.equal(fused_sum, summed) and torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("num_rows,inter", [(1, 14336), (41, 1536), (200, 14336)])
def test_silu_and_mul_quant_is_silu_and_mul_then_quantize(num_rows, inter):
    from fitserve.kernels import triton_fused

    gate_up = (torch.randn(num_rows, 2 * inter, device=CUDA) * 4).to(torch.bfloat16)
    q, scale = triton_fused.silu_and_mul_quant(gate_up)
    ref_q, ref_scale = triton_fp8.quantize_per_token(triton_fused.silu_and_mul(gate_up))
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("scheme", ["channel_dynamic", "tensor_static"])
def test_fp8_checkpoint_serves_on_cuda_as_on_the_cpu(tmp_path, scheme):
    """An fp8 checkpoint loads onto the GPU (scales moved, per-tensor shards requantized there) with
    the layers the CPU load builds, and serves greedy tokens."""
    from test_fp8_checkpoint import CHANNEL_DYNAMIC, GREEDY_8, TENSOR_STATIC, fp8_layers, write_fp8_checkpoint
    from tp_helpers import PROMPTS, tiny_llm, write_tiny_llama

    per_channel = scheme == "channel_dynamic"
    folder = write_fp8_checkpoint(write_tiny_llama(tmp_path / "dense"), tmp_path / "fp8",
                                  CHANNEL_DYNAMIC if per_channel else TENSOR_STATIC, per_channel=per_channel,
                                  input_scales=not per_channel)
    cpu, gpu = tiny_llm(folder, 1), tiny_llm(folder, 1, device="cuda")
    gpu_layers = fp8_layers(gpu.engine.runner.model)
    for name, layer in fp8_layers(cpu.engine.runner.model).items():
        assert torch.equal(gpu_layers[name].weight.cpu().view(torch.uint8), layer.weight.view(torch.uint8)), name
        assert torch.equal(gpu_layers[name].weight_scale.cpu(), layer.weight_scale), name
        assert (layer.input_scale is None) == per_channel
    tokens = [o.token_ids for o in gpu.generate(PROMPTS, GREEDY_8)]
    assert all(len(t) == 8 for t in tokens)


# -- fp8 weights without fp8 tensor cores (W8A16), forced on this card -----------------------------

@pytest.mark.parametrize("num_rows", [1, 5, 16, 17, 300])
@pytest.mark.parametrize("num_cols,inner", [(4096, 4096), (1000, 576), (70, 130)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_w8a16_kernel_matches_the_weight_only_reference(num_rows, num_cols, inner, dtype, per_tensor):
    from fitserve.kernels import triton_w8a16

    torch.manual_seed(0)
    w = torch.randn(num_cols, inner, device=CUDA) * 0.05
    qw, sw = fp8.quantize_per_tensor(w) if per_tensor else fp8.quantize_per_row(w)
    sw = sw if per_tensor else sw.reshape(1, -1)
    x = torch.randn(num_rows, inner, device=CUDA).to(dtype)
    got = triton_w8a16.weight_only_mm(x, qw, sw)
    expected = ((x.float() @ qw.float().t()) * sw)
    assert got.dtype == dtype
    assert rel_err(got, expected) < 4e-3  # one rounding to 16 bits; sums in float32 in another order


def test_w8a16_widens_every_e4m3_code_exactly():
    from fitserve.kernels import triton_w8a16

    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # all but the two NaNs
    qw = torch.cat([codes, codes[:2]]).view(torch.float8_e4m3fn).reshape(2, 128).to(CUDA)
    eye = torch.eye(128, dtype=torch.float16, device=CUDA)
    got = triton_w8a16.weight_only_mm(eye, qw, torch.ones((), device=CUDA))
    assert torch.equal(got.float().t(), qw.float())
    gemv = torch.cat([triton_w8a16.gemv(eye[i:i + 4], qw, torch.ones((), device=CUDA)) for i in range(0, 128, 4)])
    assert torch.equal(gemv.float().t(), qw.float())


@pytest.mark.parametrize("quant", ["fp8", "fp8_per_tensor"])
def test_weight_only_model_on_gpu_matches_the_cpu_path(quant, monkeypatch):
    """`--quantization fp8` on a card without fp8 tensor cores, forced here: the whole model through
    triton_w8a16 agrees with the same weights through the CPU reference, and CUDA graphs replay it."""
    from fitserve.models.llama import LlamaForCausalLM
    from paged_helpers import PagedDriver

    monkeypatch.setattr(quantization, "FP8_TENSOR_CORES", (99, 0))
    assert quantization.FP8.for_device(CUDA).weight_only
    arch = _tiny_arch()
    torch.manual_seed(0)
    shapes = LlamaForCausalLM(arch, torch.float32, torch.device("cpu")).checkpoint_tensor_shapes()
    weights = [(name, torch.randn(shape) * 0.05) for name, shape in shapes.items()]
    drivers = []
    for device in ("cpu", "cuda"):
        model = LlamaForCausalLM(arch, torch.bfloat16, torch.device(device), quantization=quant)
        if device == "cpu":  # the reference path in the weight-only form, as the GPU's
            for module in model.modules():
                if isinstance(module, quantization.Fp8Linear):
                    module.weight_only = True
        model.load_weights(weights)
        fp8_layers = [m for m in model.modules() if isinstance(m, quantization.Fp8Linear)]
        assert fp8_layers and all(m.weight_only for m in fp8_layers)
        driver = PagedDriver(model, num_blocks=16, block_size=16, device=device)
        model.bind_kv_cache(driver.caches)
        drivers.append(driver)
    chunks = [("a", list(range(1, 40))), ("b", list(range(50, 57)))]
    for step in (chunks, [("a", [5]), ("b", list(range(60, 90)))], [("a", [6]), ("b", [7])]):
        assert rel_err(drivers[1].step(step).cpu(), drivers[0].step(step)) < 3e-2


def test_weight_only_cuda_graph_decode_gives_the_eager_tokens(monkeypatch):
    monkeypatch.setattr(quantization, "FP8_TENSOR_CORES", (99, 0))
    graph_tokens, eager_tokens = graph_and_eager_tokens("fp8")
    assert graph_tokens == eager_tokens
