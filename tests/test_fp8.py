"""FP8 on the CPU: the quantization rules, online quantization at load (one projection at a time),
the fp8 KV cache in the reference kernels, serving with both, and the planner's byte counts."""

from __future__ import annotations

import pytest
import torch

from fitserve.arch_config import ArchConfig
from fitserve.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from fitserve.forward_batch import PAD_SLOT
from fitserve.kernels import fp8, reference
from fitserve.layers.formats import fp8 as quantization
from fitserve.layers.formats.unquantized import Linear
from fitserve.layers.formats.fp8 import Fp8Linear
from fitserve.layers.formats.registry import make_linear
from fitserve.models.llama import LlamaForCausalLM
from fitserve.models.loader import init_dummy
from paged_helpers import PagedDriver, make_batch

ARCH = ArchConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)


def fp8_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def test_e4m3_rules_saturate_and_round_to_nearest_even():
    q = fp8.quantize(torch.tensor([500.0, -1e6, 0.3, 84.0, 88.0, 1e-4]), 1.0).float()
    assert q.tolist()[:2] == [448.0, -448.0], "saturates, never NaN"
    assert q[2].item() == 0.3125 and q[3].item() == 80.0, "nearest, ties to even (84 lies between 80 and 88)"
    assert q[5].item() == 0.0, "below the smallest subnormal flushes to zero"


def test_per_row_scales_map_each_rows_maximum_to_448():
    x = torch.randn(5, 64) * torch.tensor([1.0, 10.0, 0.01, 0.0, 1000.0])[:, None]
    q, scale = fp8.quantize_per_row(x)
    assert scale.shape == (5, 1) and scale.dtype == torch.float32
    assert scale[3].item() == pytest.approx(fp8.MIN_SCALE), "an all-zero row gets the minimum scale"
    assert torch.equal(q.float().abs().amax(-1)[[0, 1, 2, 4]], torch.full((4,), 448.0))
    relative = (fp8.dequantize(q, scale, torch.float32) - x).norm() / x.norm()
    assert relative < 0.04, "3 mantissa bits: a few percent"


def test_scaled_mm_reference_is_the_dequantized_product():
    x, w = torch.randn(7, 64), torch.randn(48, 64)
    qx, sx = fp8.quantize_per_row(x)
    qw, sw = fp8.quantize_per_row(w)
    got = fp8.scaled_mm_reference(qx, sx, qw, sw.reshape(1, -1), torch.float32)
    expected = (qx.float() * sx) @ (qw.float() * sw).t()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["fp8", "fp8_per_tensor"])
def test_shards_quantize_to_the_merged_weights_quantization(quant):
    weight = torch.randn(96, 64).to(torch.bfloat16)
    layer = make_linear(64, (64, 16, 16), torch.bfloat16, torch.device("cpu"), quant)
    for index, shard in enumerate(weight.split([64, 16, 16])):
        assert not layer.is_loaded
        layer.load_shard(index, shard)
    assert layer.is_loaded and layer._staging is None, "no serving-dtype copy stays behind"
    q, scale = fp8.quantize_per_tensor(weight) if quant == "fp8_per_tensor" else fp8.quantize_per_row(weight)
    assert torch.equal(fp8_bytes(layer.weight), fp8_bytes(q))
    assert torch.equal(layer.weight_scale.reshape(-1), scale.reshape(-1))
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.element_size() == 1


@pytest.mark.parametrize("quant", ["fp8", "fp8_per_tensor"])
def test_fp8_linear_is_close_to_the_bf16_layer(quant):
    torch.manual_seed(0)
    weight = (torch.randn(256, 128) * 0.05).to(torch.bfloat16)
    dense = Linear(128, 256, torch.bfloat16, torch.device("cpu"))
    dense.load_shard(0, weight)
    layer = make_linear(128, 256, torch.bfloat16, torch.device("cpu"), quant)
    layer.load_shard(0, weight)
    x = torch.randn(9, 128).to(torch.bfloat16)
    got, expected = layer(x), dense(x)
    assert got.dtype == torch.bfloat16 and got.shape == (9, 256)
    assert ((got.float() - expected.float()).norm() / expected.float().norm()) < 0.06


def test_per_token_outputs_do_not_depend_on_the_batch():
    layer = make_linear(128, 64, torch.float32, torch.device("cpu"), "fp8")
    layer.load_shard(0, torch.randn(64, 128))
    x = torch.randn(5, 128)
    big = torch.cat([x, torch.randn(3, 128) * 100])  # loud neighbours
    assert torch.equal(fp8_bytes(fp8.quantize_per_row(x)[0]), fp8_bytes(fp8.quantize_per_row(big)[0][:5]))
    torch.testing.assert_close(layer(x), layer(big)[:5], rtol=1e-5, atol=1e-5)  # up to the matmul's blocking
    per_tensor = make_linear(128, 64, torch.float32, torch.device("cpu"), "fp8_per_tensor")
    per_tensor.load_shard(0, torch.randn(64, 128))
    assert not torch.allclose(per_tensor(x), per_tensor(big)[:5], rtol=1e-3), "per-tensor scales do"


def test_calibrated_per_tensor_scale_is_static_and_saturates():
    layer = make_linear(128, 64, torch.float32, torch.device("cpu"), "fp8_per_tensor")
    layer.load_shard(0, torch.randn(64, 128))
    calibration = [torch.randn(7, 128), torch.randn(3, 128) * 2]
    with quantization.observe_activations(layer) as num_layers:
        for x in calibration:
            layer(x)
    assert num_layers == 1
    amax = max(x.abs().max() for x in calibration)
    assert layer.input_scale is not None and layer.input_scale.item() == fp8.scale_from_amax(amax).item()
    x = torch.randn(5, 128)
    big = torch.cat([x, torch.randn(3, 128) * 100])  # loud neighbours no longer move the scale
    torch.testing.assert_close(layer(x), layer(big)[:5], rtol=1e-5, atol=1e-5)
    expected = fp8.scaled_mm_reference(fp8.quantize(big, layer.input_scale), layer.input_scale, layer.weight,
                                       layer.weight_scale, torch.float32)
    assert torch.equal(layer(big), expected), "static scale, values past the calibrated range saturate"
    assert fp8.quantize(big, layer.input_scale)[5:].float().abs().max().item() == fp8.FP8_MAX


def test_start_up_calibrates_per_tensor_layers_on_built_in_text():
    from fitserve.runner.calibration import CALIBRATION_TEXTS, calibrate_fp8_activation_scales
    from fitserve.quantcheck.prompts import PROMPTS

    assert not set(CALIBRATION_TEXTS) & set(PROMPTS), "the quality check must not test on calibration text"
    model = LlamaForCausalLM(ARCH, torch.float32, torch.device("cpu"), quantization="fp8_per_tensor")
    init_dummy(model)
    seen: dict[str, float] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(
        name, max(seen.get(name, 0.0), args[0].abs().max().item())))
        for name, m in model.named_modules() if isinstance(m, Fp8Linear)]
    ids = [[(7 * i + j) % ARCH.vocab_size for j in range(5 + 20 * i)] for i in range(3)]
    assert calibrate_fp8_activation_scales(model, ids, torch.device("cpu")) == 4 * ARCH.num_hidden_layers
    for hook in hooks:
        hook.remove()
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            assert module.input_scale.item() == fp8.scale_from_amax(torch.tensor(seen[name])).item(), name
    assert model.layers[0].self_attn.attn.k_cache.shape[0] == 0, "the calibration cache is let go"


def test_unknown_quantization_is_a_config_error():
    with pytest.raises(ConfigError, match="--quantization"):
        make_linear(8, 8, torch.bfloat16, torch.device("cpu"), "int4")
    with pytest.raises(ConfigError, match="fp8_per_tensor"):
        EngineConfig(quantization="int8")


def test_only_the_four_linear_layers_are_quantized():
    model = LlamaForCausalLM(ARCH, torch.bfloat16, torch.device("cpu"), quantization="fp8")
    fp8_layers = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert fp8_layers == {f"layers.{i}.{p}" for i in range(2) for p in
                          ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    assert model.norm.weight.dtype == torch.bfloat16 and isinstance(model.lm_head, Linear)


def _hf_tensors(model: LlamaForCausalLM):
    """The HF layout of a serving-dtype model: separate q/k/v and gate/up tensors, layer by layer."""
    for name, tensor in model.state_dict().items():
        if "qkv_proj" in name:
            for part, t in zip(("q_proj", "k_proj", "v_proj"), tensor.split([128, 64, 64])):
                yield f"model.{name.replace('qkv_proj', part)}", t
        elif "gate_up_proj" in name:
            for part, t in zip(("gate_proj", "up_proj"), tensor.split([256, 256])):
                yield f"model.{name.replace('gate_up_proj', part)}", t
        elif name == "lm_head.weight":
            yield name, tensor
        else:
            yield f"model.{name}", tensor


@pytest.mark.parametrize("quant", ["fp8", "fp8_per_tensor"])
def test_checkpoint_load_quantizes_tensor_by_tensor(quant):
    """At every point of the load at most one projection waits in the serving dtype, and the result is
    the quantized serving-dtype model."""
    torch.manual_seed(0)
    dense = LlamaForCausalLM(ARCH, torch.bfloat16, torch.device("cpu"))
    init_dummy(dense)
    model = LlamaForCausalLM(ARCH, torch.bfloat16, torch.device("cpu"), quantization=quant)
    staged_counts = []

    def watched():
        for item in _hf_tensors(dense):
            yield item
            staged_counts.append(sum(m._staging is not None for m in model.modules() if isinstance(m, Fp8Linear)))
    loaded = model.load_weights(watched())
    assert loaded == model.expected_weight_names()
    assert max(staged_counts) <= 1 and staged_counts[-1] == 0
    per_tensor = quant == "fp8_per_tensor"
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            source = dense.get_submodule(name).weight
            q, _ = fp8.quantize_per_tensor(source) if per_tensor else fp8.quantize_per_row(source)
            assert torch.equal(fp8_bytes(module.weight), fp8_bytes(q)), name


def test_dummy_fp8_model_is_the_quantized_dummy_bf16_model():
    dense = LlamaForCausalLM(ARCH, torch.bfloat16, torch.device("cpu"))
    init_dummy(dense)
    model = LlamaForCausalLM(ARCH, torch.bfloat16, torch.device("cpu"), quantization="fp8")
    init_dummy(model)
    assert torch.equal(model.embed_tokens.weight, dense.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    q, _ = fp8.quantize_per_row(dense.layers[1].mlp.down_proj.weight)
    assert torch.equal(fp8_bytes(model.layers[1].mlp.down_proj.weight), fp8_bytes(q))


def test_quantize_divides_a_copy_and_never_its_input():
    """The load-time quantization divides and clamps one float32 copy in place, never the input."""
    weight = torch.randn(64, 32).to(torch.bfloat16)
    q = fp8.quantize(weight, torch.ones(64, 1))
    assert torch.equal(q.float(), weight.float().clamp(-448, 448).to(torch.float8_e4m3fn).float())
    x = torch.randn(4, 4)
    before = x.clone()
    fp8.quantize(x, 2.0)
    assert torch.equal(x, before), "a float32 input is copied, never changed in place"


@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.25, 4.0)])
def test_fp8_cache_reference_store_and_read(k_scale, v_scale):
    torch.manual_seed(0)
    shape = (6, 4, 2, 32)
    k_cache = torch.zeros(shape, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros(shape, dtype=torch.float8_e4m3fn)
    k, v = torch.randn(5, 2, 32), torch.randn(5, 2, 32)
    slots = torch.tensor([3, 9, PAD_SLOT, 0, 22])
    reference.store_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    flat_k = k_cache.view(-1, 2, 32)
    assert torch.equal(fp8_bytes(flat_k[9]), fp8_bytes(fp8.quantize(k[1], k_scale)))
    assert (fp8_bytes(flat_k[[1, 2, 4]]) == 0).all(), "PAD_SLOT and untouched slots stay empty"
    # attention over the fp8 cache equals attention over its dequantized float copy
    batch = make_batch([0, 0], [0, 1], [0, 1], [2], [2], [[0]])
    reference.store_kv(k[:2], v[:2], k_cache, v_cache, batch.slot_mapping, k_scale, v_scale)
    q = torch.randn(2, 4, 32)
    got = reference.paged_attention(q, k_cache, v_cache, batch, 32 ** -0.5, k_scale, v_scale)
    expected = reference.paged_attention(q, k_cache.float() * k_scale, v_cache.float() * v_scale, batch, 32 ** -0.5)
    torch.testing.assert_close(got, expected)


def test_fp8_model_with_fp8_cache_stays_close_to_bf16_on_the_cpu():
    torch.manual_seed(0)
    logits = {}
    for quant, kv_dtype in ((None, torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        model = LlamaForCausalLM(ARCH, torch.bfloat16, torch.device("cpu"), quantization=quant)
        init_dummy(model)
        driver = PagedDriver(model, num_blocks=8, block_size=16)
        driver.caches = [(k.to(kv_dtype), v.to(kv_dtype)) for k, v in driver.caches]
        model.bind_kv_cache(driver.caches)
        out = driver.step([("a", list(range(1, 30))), ("b", list(range(40, 45)))])
        logits[quant] = torch.cat([out, driver.step([("a", [3]), ("b", [4])])])
    base, quantized = logits[None].float(), logits["fp8"].float()
    assert ((quantized - base).norm() / base.norm()) < 0.1


def test_llm_serves_fp8_weights_and_cache_with_twice_the_tokens():
    from fitserve.llm import LLM
    from fitserve.sampling_params import SamplingParams

    cache, limits = 16 * 2**20, SchedulerConfig(max_model_len=256)
    base = LLM(config=EngineConfig(device="cpu", dtype="bfloat16", cache=CacheConfig(kv_cache_memory_bytes=cache),
                                   scheduler=limits))
    quant = LLM(config=EngineConfig(device="cpu", dtype="bfloat16", quantization="fp8", scheduler=limits,
                                    cache=CacheConfig(kv_cache_memory_bytes=cache, kv_cache_dtype="fp8")))
    base_tokens, block_size = base.engine.runner.kv_capacity().num_tokens, 16
    assert 2 * base_tokens <= quant.engine.runner.kv_capacity().num_tokens <= 2 * base_tokens + block_size
    assert quant.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    params = SamplingParams(max_tokens=8, temperature=0)
    text = quant.generate(["The capital of France is"], params)[0].text
    assert "Paris" in text


def test_calibration_text_goes_half_through_the_chat_template():
    from fitserve.runner.calibration import CALIBRATION_TEXTS, MAX_TOKENS_PER_TEXT, calibration_token_ids

    def encode(text):
        return [ord(c) % 250 for c in text]

    def chat(text):
        return [251] + encode(text) + [252]

    plain = calibration_token_ids(encode)
    mixed = calibration_token_ids(encode, chat)
    assert plain == [encode(t)[:MAX_TOKENS_PER_TEXT] for t in CALIBRATION_TEXTS]
    assert [ids[0] == 251 for ids in mixed] == [i % 2 == 1 for i in range(len(CALIBRATION_TEXTS))]
    assert all(len(ids) <= MAX_TOKENS_PER_TEXT for ids in mixed)


def test_llm_with_per_tensor_scales_calibrates_at_start_up(caplog):
    from fitserve.llm import LLM
    from fitserve.sampling_params import SamplingParams

    with caplog.at_level("INFO", logger="fitserve"):
        llm = LLM(config=EngineConfig(device="cpu", quantization="fp8_per_tensor",
                                      scheduler=SchedulerConfig(max_model_len=256),
                                      cache=CacheConfig(kv_cache_memory_bytes=16 * 2**20)))
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.input_scale is not None and m.input_scale.item() > 0 for m in layers)
    assert "static input scales of 120 layers calibrated" in caplog.text  # SmolLM2: 30 layers x 4
    assert "Linear layers: fp8_per_tensor weights and activations (W8A8)" in caplog.text
    text = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))[0].text
    assert "Paris" in text


def test_planner_counts_fp8_weights_and_one_byte_kv():
    from plan_helpers import llama_8b_inputs

    from fitserve.plan.planner import plan_memory

    base = plan_memory(llama_8b_inputs(0.9))
    for quant in ("fp8", "fp8_per_tensor"):
        plan = plan_memory(llama_8b_inputs(0.9, quantization=quant, kv_cache_dtype="fp8"))
        assert plan.weights.linear_dtype == "fp8"
        assert 8.4e9 < plan.weights.total_bytes < 9.2e9, "about 8.5 GiB: linear layers in one byte"
        assert plan.kv_block_bytes * 2 == base.kv_block_bytes

