"""Integer group-quantized checkpoints (GPTQ, AWQ, compressed-tensors pack-quantized) served as stored.

The checkpoints are written here from each format's published definition: GPTQ's and AWQ's int32
packing as AutoGPTQ and AutoAWQ write it, and compressed-tensors' through that library's own
`pack_to_int32`. A tiny Llama written by transformers is quantized by the test; the reference is the
same transformers model holding the dequantized weights, so fitserve must match it to float32
rounding (prefill and decode through the paged cache, and the whole engine's greedy tokens).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from hf_compare_helpers import check_engine_greedy, check_prefill_and_decode, load_ours
from safetensors.torch import save_file

from fitserve.config import ConfigError, EngineConfig
from fitserve.kernels import int_quant
from fitserve.layers.formats.int_quant import IntQuantFormat, IntQuantLinear
from fitserve.weights.int_checkpoint import IntQuantScheme, parse_int_quantization
from fitserve.weights.source import resolve_model_source

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack_words(values: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unsigned values -> int32 words along `dim`, value i of each word at bits * i (lowest first);
    `order`: word slot i holds the value at position order[i] of its run (AWQ's interleave)."""
    per_word = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    runs = v.reshape(*v.shape[:-1], -1, per_word)
    word = torch.zeros(runs.shape[:-1], dtype=torch.int64)
    for slot in range(per_word):
        word |= runs[..., (order or range(per_word))[slot]] << (bits * slot)
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word.movedim(-1, dim)


def quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, g_idx: torch.Tensor | None):
    """Min-max quantization of W [N, K] by groups of columns -> (values [N, K], zeros [N, G], scales [N, G] fp16)."""
    num_cols = weight.shape[1]
    groups = g_idx.long() if g_idx is not None else torch.arange(num_cols) // group_size
    num_groups = int(groups.max()) + 1
    scales, zeros = torch.empty(weight.shape[0], num_groups), torch.empty(weight.shape[0], num_groups)
    top = (1 << bits) - 1
    for g in range(num_groups):
        cols = weight[:, groups == g]
        if symmetric:
            scale = cols.abs().amax(1) / (top // 2)
            zero = torch.full_like(scale, 1 << (bits - 1))
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            scale = (hi - lo) / top
            zero = (-lo / scale).round().clamp(0, top)
        scales[:, g], zeros[:, g] = scale.half().float(), zero
    values = (weight / scales[:, groups] + zeros[:, groups]).round().clamp(0, top)
    return values.to(torch.uint8), zeros.to(torch.uint8), scales.half()


def checkpoint_tensors(method: str, prefix: str, values, zeros, scales, g_idx, bits: int, symmetric: bool):
    """One projection's tensors in `method`'s layout."""
    if method == "gptq":
        tensors = {"qweight": pack_words(values.t(), bits, 0), "scales": scales.t().contiguous(),
                   "qzeros": pack_words((zeros.t().to(torch.int32) - 1) & ((1 << bits) - 1), bits, 1)}
        tensors["g_idx"] = g_idx if g_idx is not None else torch.arange(values.shape[1], dtype=torch.int32) // (
            values.shape[1] // scales.shape[1])
    elif method == "awq":
        order = int_quant.AWQ_PACK_ORDER
        tensors = {"qweight": pack_words(values.t(), 4, 1, order), "qzeros": pack_words(zeros.t(), 4, 1, order),
                   "scales": scales.t().contiguous()}
    else:
        offset = 1 << (bits - 1)
        tensors = {"weight_packed": pack_to_int32((values.to(torch.int16) - offset).to(torch.int8), bits, 1),
                   "weight_scale": scales, "weight_shape": torch.tensor(list(values.shape))}
        if not symmetric:
            tensors["weight_zero_point"] = pack_to_int32((zeros.to(torch.int16) - offset).to(torch.int8), bits, 0)
        if g_idx is not None:
            tensors["weight_g_idx"] = g_idx
    return {f"{prefix}.{name}": t.clone(memory_format=torch.contiguous_format) for name, t in tensors.items()}


def quantization_config(method: str, bits: int, group_size: int, symmetric: bool, act_order: bool) -> dict:
    if method == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": symmetric,
                "desc_act": act_order, "checkpoint_format": "gptq"}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group_size,
               "actorder": "group" if act_order else None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": ["lm_head"]}


def quantized_checkpoint(folder, method: str, bits: int = 4, group_size: int = 32, symmetric: bool = False,
                         act_order: bool = False):
    """A tiny transformers Llama, its block projections quantized and written in `method`'s layout; returns
    the transformers model holding the dequantized weights (the reference)."""
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(folder)  # config.json; the weights are written again below
    state = {name: t.contiguous() for name, t in hf.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    shared_g_idx: dict[str, torch.Tensor] = {}  # q, k, v (and gate, up) see one input: GPTQ orders them alike
    for name, module in hf.named_modules():
        if not name.endswith(PROJECTIONS):
            continue
        weight = module.weight.data
        num_cols = weight.shape[1]
        input_of = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
        if act_order and input_of not in shared_g_idx:
            shared_g_idx[input_of] = (torch.argsort(torch.randperm(num_cols, generator=gen)) // group_size).to(
                torch.int32)
        g_idx = shared_g_idx.get(input_of)
        values, zeros, scales = quantize(weight, bits, group_size, symmetric, g_idx)
        groups = g_idx.long() if g_idx is not None else torch.arange(num_cols) // group_size
        module.weight.data = (values.float() - zeros[:, groups].float()) * scales.float()[:, groups]
        del state[f"{name}.weight"]
        state.update(checkpoint_tensors(method, name, values, zeros, scales, g_idx, bits, symmetric))
    for path in folder.glob("*.safetensors"):
        path.unlink()
    save_file(state, folder / "model.safetensors")
    config_json = json.loads((folder / "config.json").read_text())
    config_json["quantization_config"] = quantization_config(method, bits, group_size, symmetric, act_order)
    (folder / "config.json").write_text(json.dumps(config_json))
    return hf


CASES = [("gptq", 4, False, False), ("gptq", 4, True, True), ("gptq", 8, False, False), ("awq", 4, False, False),
         ("compressed-tensors", 4, True, False), ("compressed-tensors", 8, False, True)]


@pytest.mark.parametrize("method,bits,symmetric,act_order", CASES)
def test_checkpoint_matches_transformers_on_the_dequantized_weights(tmp_path, method, bits, symmetric, act_order):
    hf = quantized_checkpoint(tmp_path, method, bits, symmetric=symmetric, act_order=act_order)
    source, ours = load_ours(tmp_path)
    assert source.checkpoint_int == IntQuantScheme(method, bits, 32, symmetric if method != "awq" else False,
                                                   act_order, zeros_minus_one=method == "gptq")
    layers = [m for m in ours.modules() if isinstance(m, IntQuantLinear)]
    assert len(layers) == 4 * 2 and all(m.qweight.dtype == torch.uint8 for m in layers)
    check_prefill_and_decode(ours, hf)


def test_engine_greedy_tokens_on_a_gptq_checkpoint(tmp_path):
    check_engine_greedy(tmp_path, quantized_checkpoint(tmp_path, "gptq", act_order=True))


def test_four_bit_weights_take_an_eighth_of_float32(tmp_path):
    quantized_checkpoint(tmp_path, "awq")
    _, ours = load_ours(tmp_path)
    layer = ours.layers[0].mlp.gate_up_proj
    assert layer.qweight.numel() * layer.qweight.element_size() == 256 * 64 // 2
    assert sum(t.numel() * t.element_size() for t in layer.parameters()) < 256 * 64 * 4 / 6  # scales and zeros


def test_unpacking_inverts_the_published_packings():
    gen = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        values = torch.randint(0, 1 << bits, (16, 24), generator=gen, dtype=torch.uint8)
        assert torch.equal(int_quant.unpack_int32(pack_words(values, bits, 0), bits, 0), values)
        assert torch.equal(int_quant.unpack_int32(pack_words(values, bits, 1), bits, 1), values)
        assert torch.equal(int_quant.load_values(int_quant.store_values(values, bits), bits), values)
    values = torch.randint(0, 16, (8, 16), generator=gen, dtype=torch.uint8)
    assert torch.equal(int_quant.awq_columns(pack_words(values, 4, 1, int_quant.AWQ_PACK_ORDER)), values.t())
    assert not torch.equal(int_quant.awq_columns(pack_words(values, 4, 1)), values.t()), "the order matters"


def test_dequantize_by_g_idx_and_by_column_order():
    values = torch.tensor([[0, 15, 3, 8]], dtype=torch.uint8)
    scales, zeros = torch.tensor([[1.0, 0.5]]), torch.tensor([[8, 0]], dtype=torch.uint8)
    in_order = int_quant.dequantize(int_quant.store_values(values, 4), scales, zeros, None, 4, torch.float32)
    assert in_order.tolist() == [[-8.0, 7.0, 1.5, 4.0]]
    by_g_idx = int_quant.dequantize(int_quant.store_values(values, 4), scales, zeros,
                                    torch.tensor([1, 0, 0, 1], dtype=torch.int32), 4, torch.float32)
    assert by_g_idx.tolist() == [[0.0, 7.0, -5.0, 4.0]]


def test_parts_of_a_merged_projection_with_different_g_idx_are_refused():
    scheme = IntQuantScheme("gptq", 4, 32, True, True)
    layer = IntQuantFormat(scheme).create(64, (32, 32), torch.float32, torch.device("cpu"))
    for shard, g_idx in enumerate((torch.arange(64) // 32, torch.arange(64).flip(0) // 32)):
        tensors = {"qweight": torch.zeros(8, 32, dtype=torch.int32), "scales": torch.ones(2, 32).half(),
                   "g_idx": g_idx.to(torch.int32)}
        if shard == 1:
            with pytest.raises(ValueError, match="different g_idx"):
                for piece, tensor in tensors.items():
                    layer.load(shard, piece, tensor)
        else:
            for piece, tensor in tensors.items():
                layer.load(shard, piece, tensor)


def test_an_incomplete_layer_is_refused():
    layer = IntQuantFormat(IntQuantScheme("awq", 4, 32, False, False)).create(64, (32, 16), torch.float32,
                                                                                torch.device("cpu"))
    layer.load(0, "qweight", torch.zeros(64, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"shards \[0, 1\] incomplete"):
        layer.finish_loading()
    with pytest.raises(ValueError, match="no 'weight' tensor"):
        layer.load(0, "weight", torch.zeros(32, 64))


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "3-bit"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "GEMM version"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
        "input_activations": {"num_bits": 8, "type": "int"}}}}, "also quantizes activations"),
])
def test_unsupported_schemes_are_refused_before_loading(qc, message):
    with pytest.raises(ConfigError, match=message):
        parse_int_quantization(qc)


def test_quantization_flag_with_an_integer_checkpoint_is_refused(tmp_path):
    from fitserve.models.loader import load_model

    quantized_checkpoint(tmp_path, "gptq")
    source = resolve_model_source(EngineConfig(model=str(tmp_path)))
    with pytest.raises(ConfigError, match="served as stored: leave --quantization out"):
        load_model(source, torch.float32, torch.device("cpu"), progress=False, quantization="fp8")


def test_start_up_names_the_checkpoint_scheme(tmp_path, caplog):
    from fitserve.config import CacheConfig, SchedulerConfig
    from fitserve.llm import build_engine

    quantized_checkpoint(tmp_path, "compressed-tensors", symmetric=True)
    config = EngineConfig(model=str(tmp_path), dtype="float32", device="cpu", cache=CacheConfig(num_gpu_blocks_override=16),
                          scheduler=SchedulerConfig(max_model_len=128, max_num_seqs=4))
    with caplog.at_level("INFO", logger="fitserve"):
        build_engine(config, progress=False)
    assert ("Linear layers: compressed-tensors checkpoint: 4-bit integer weights, group 32, symmetric, "
            "activations in --dtype") in caplog.text


def test_plan_counts_the_bytes_the_layers_hold(tmp_path):
    from fitserve.plan.shapes import weight_bytes

    quantized_checkpoint(tmp_path, "gptq", act_order=True)
    source, ours = load_ours(tmp_path)
    planned = weight_bytes(source.param_counts(), "float32", None)
    held = sum(t.numel() * t.element_size() for m in ours.modules() if isinstance(m, IntQuantLinear)
               for t in m.parameters())
    assert planned.linear_dtype == "gptq" and planned.linear_bytes == held


def test_plan_of_a_4_bit_llama_3_8b_on_a_12_gb_card(tmp_path, capsys):
    """What 4 bits buy: Llama-3-8B (GPTQ, group 128) fits a 12 GB card with 8k context at 0.90."""
    import shutil

    from fitserve.cli import main

    shutil.copytree("configs/llama-3-8b-instruct", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = quantization_config("gptq", 4, 128, True, False)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--model", str(tmp_path / "m"), "--gpu-memory", "12GiB", "--gpu-memory-utilization",
                 "0.9", "--max-model-len", "8192", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["weights"]["linear_dtype"] == "gptq"
    assert plan["weights"]["linear_bytes"] < 4.0 * 2**30  # bf16: 13 GiB of projections


def test_group_order_turns_act_order_into_whole_groups():
    """Columns sorted by g_idx, multiplied by x's columns in that order, give the act-order product; a g_idx
    whose groups are not all K / G columns has no such order."""
    torch.manual_seed(3)
    g_idx = (torch.arange(96, dtype=torch.int32) // 32)[torch.randperm(96)]
    order = int_quant.group_order(g_idx, 3)
    assert order is not None and torch.equal(g_idx[order].long(), torch.arange(96) // 32)
    values = torch.randint(0, 16, (8, 96), dtype=torch.uint8)
    scales, zeros = torch.rand(8, 3) + 0.1, torch.randint(0, 16, (8, 3), dtype=torch.uint8)
    x = torch.randn(5, 96)
    expected = int_quant.int_quant_mm_reference(x, int_quant.store_values(values, 4), scales, zeros, g_idx, 4)
    sorted_weights = int_quant.store_values(values[:, order], 4)
    got = int_quant.int_quant_mm_reference(x[:, order], sorted_weights, scales, zeros, None, 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    uneven = g_idx.clone()
    uneven[uneven == 1] = 0  # group 0 now has 64 columns, group 1 none
    assert int_quant.group_order(uneven, 3) is None
    assert int_quant.group_order(g_idx[:95], 3) is None  # 95 columns are not whole groups of 3
