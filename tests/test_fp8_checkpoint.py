"""Checkpoints stored in fp8 (weights/fp8_checkpoint.py): config.json's quantization_config picks
the serving scheme, the loader places the e4m3 tensors and their scales as they are (no
requantization but where a merged per-tensor layer needs one scale), tensor-parallel ranks take
their rows' scales, and the planner counts them as fp8 without --quantization.

`write_fp8_checkpoint` stands in for llm-compressor / AutoFP8: it rewrites a tiny transformers
checkpoint with fitserve's own e4m3 rounding (kernels/fp8.py) in their tensor layout, so a
checkpoint quantized per channel must load into exactly the model online quantization builds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tp_helpers import PROMPTS, write_tiny_llama

from fitserve.cli import main
from fitserve.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from fitserve.kernels import fp8
from fitserve.layers.parallel import TensorParallel
from fitserve.layers.formats.fp8 import Fp8Linear
from fitserve.llm import LLM
from fitserve.models.loader import load_model
from fitserve.quantcheck.check import run_check
from fitserve.sampling_params import SamplingParams
from fitserve.weights.fp8_checkpoint import CheckpointFp8, parse_quantization_config, resolve_quantization
from fitserve.weights.source import resolve_model_source

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU = torch.device("cpu")
GREEDY_8 = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

CHANNEL_DYNAMIC = {  # llm-compressor's FP8_DYNAMIC recipe
    "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True}}},
}
TENSOR_STATIC = {"quant_method": "fp8", "activation_scheme": "static"}  # AutoFP8's static format
TENSOR_DYNAMIC = {"quant_method": "fp8", "activation_scheme": "dynamic"}


def write_fp8_checkpoint(source: Path, folder: Path, quantization_config: dict, per_channel: bool,
                         input_scales: bool = False, kv_scales: dict[str, float] | None = None) -> Path:
    """`source` (a transformers checkpoint) with its block projections in e4m3 plus weight_scale
    (per channel [N, 1] or per tensor []), input_scale (the largest |x| of made-up inputs, one per
    projection: they differ inside q/k/v on purpose) and self_attn k_scale / v_scale when given."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        if name.split(".")[-2] not in PROJECTIONS:
            tensors[name] = tensor
            continue
        q, scale = fp8.quantize_per_row(tensor) if per_channel else fp8.quantize_per_tensor(tensor)
        base = name.removesuffix(".weight")
        tensors[name], tensors[f"{base}.weight_scale"] = q, scale.contiguous()
        if input_scales:
            tensors[f"{base}.input_scale"] = torch.tensor(0.01 * (1 + PROJECTIONS.index(name.split(".")[-2])))
    for name, value in (kv_scales or {}).items():
        tensors[name] = torch.tensor(value)
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return folder


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("dense"))


def fp8_layers(model) -> dict[str, Fp8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}


def load(folder: Path, quantization: str | None = None, tp: TensorParallel = TensorParallel()):
    source = resolve_model_source(EngineConfig(model=str(folder)))
    return load_model(source, torch.float32, CPU, progress=False, quantization=source.quantization(quantization),
                      tp=tp)


def tiny_llm(folder: Path, kv_cache_dtype: str = "auto", **fields) -> LLM:
    return LLM(config=EngineConfig(model=str(folder), dtype="float32", device="cpu",
                                   cache=CacheConfig(kv_cache_memory_bytes=8 << 20, kv_cache_dtype=kv_cache_dtype),
                                   scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4), **fields))


def test_per_channel_checkpoint_is_the_online_fp8_model(dense_folder, tmp_path):
    """Same bytes, same scales, same greedy tokens as --quantization fp8 on the dense checkpoint,
    and no --quantization flag needed."""
    folder = write_fp8_checkpoint(dense_folder, tmp_path / "fp8", CHANNEL_DYNAMIC, per_channel=True)
    online, stored = fp8_layers(load(dense_folder, "fp8")), fp8_layers(load(folder))
    assert stored.keys() == online.keys() and len(stored) == 4 * 3
    for name, layer in stored.items():
        assert torch.equal(layer.weight.view(torch.uint8), online[name].weight.view(torch.uint8)), name
        assert torch.equal(layer.weight_scale, online[name].weight_scale), name
    tokens = [o.token_ids for o in tiny_llm(folder).generate(PROMPTS, GREEDY_8)]
    assert tokens == [o.token_ids for o in tiny_llm(dense_folder, quantization="fp8").generate(PROMPTS, GREEDY_8)]


def test_static_checkpoint_runs_per_tensor_with_its_input_scales(dense_folder, tmp_path):
    """q, k and v carry different scales: the merged layer takes the largest, copies that shard's bytes
    and requantizes the others onto it; its static input scale is the largest of the three, and
    start-up does not calibrate over it."""
    folder = write_fp8_checkpoint(dense_folder, tmp_path / "static", TENSOR_STATIC, per_channel=False,
                                  input_scales=True)
    tensors = load_file(folder / "model.safetensors")
    llm = tiny_llm(folder)
    assert llm.engine.runner.model.quantization == "fp8_per_tensor"
    qkv = llm.engine.runner.model.layers[1].self_attn.qkv_proj
    prefix = "model.layers.1.self_attn"
    scales = [tensors[f"{prefix}.{p}_proj.weight_scale"] for p in "qkv"]
    largest = max(scales)
    assert qkv.weight_scale.item() == largest.item()
    for rows, proj, scale in zip(qkv.weight.split(list(qkv.shard_sizes)), "qkv", scales):
        q = tensors[f"{prefix}.{proj}_proj.weight"]
        expected = q if scale == largest else fp8.quantize(q.float() * scale, largest)
        assert torch.equal(rows.view(torch.uint8), expected.view(torch.uint8)), proj
    assert qkv.input_scale.item() == pytest.approx(0.03)  # v_proj's, the largest of 0.01, 0.02, 0.03
    assert llm.engine.runner.model.layers[1].mlp.down_proj.input_scale.item() == pytest.approx(0.07)
    assert all(len(o.token_ids) == 8 for o in llm.generate(PROMPTS, GREEDY_8))


def test_per_tensor_scales_repeat_per_row_under_fp8(dense_folder, tmp_path):
    """A dynamic per-tensor checkpoint, and a static one under --quantization fp8, run per channel:
    each row keeps its tensor's scale (exact), input scales go unused."""
    dynamic = write_fp8_checkpoint(dense_folder, tmp_path / "dynamic", TENSOR_DYNAMIC, per_channel=False)
    static = write_fp8_checkpoint(dense_folder, tmp_path / "static", TENSOR_STATIC, per_channel=False,
                                  input_scales=True)
    tensors = load_file(dynamic / "model.safetensors")
    for model in (load(dynamic), load(static, "fp8")):
        gate_up = model.layers[0].mlp.gate_up_proj
        assert not gate_up.per_tensor and gate_up.input_scale is None
        for part, proj in zip(gate_up.weight_scale[0].split(list(gate_up.shard_sizes)), ("gate", "up")):
            assert torch.equal(part, tensors[f"model.layers.0.mlp.{proj}_proj.weight_scale"].expand(part.shape))


def test_tensor_parallel_ranks_take_their_rows_scales(dense_folder, tmp_path):
    folder = write_fp8_checkpoint(dense_folder, tmp_path / "fp8", CHANNEL_DYNAMIC, per_channel=True)
    whole = load(folder)
    for rank in range(2):
        part = load(folder, tp=TensorParallel(rank, 2))
        a, b = whole.layers[2], part.layers[2]
        gate, _ = a.mlp.gate_up_proj.weight_scale[0].split([96, 96])
        assert torch.equal(b.mlp.gate_up_proj.weight_scale[0][:48], gate[rank * 48:(rank + 1) * 48])
        assert torch.equal(b.mlp.down_proj.weight_scale, a.mlp.down_proj.weight_scale), "row-parallel: every row"
        assert torch.equal(b.mlp.down_proj.weight.view(torch.uint8),
                           a.mlp.down_proj.weight[:, rank * 48:(rank + 1) * 48].view(torch.uint8))


def test_kv_cache_scales_come_from_the_checkpoint(dense_folder, tmp_path, caplog):
    kv_scales = {"model.layers.0.self_attn.k_scale": 0.5, "model.layers.0.self_attn.v_scale": 0.25,
                 "model.layers.2.self_attn.k_proj.output_scale": 2.0}  # the older name
    folder = write_fp8_checkpoint(dense_folder, tmp_path / "kv", {**CHANNEL_DYNAMIC, "kv_cache_scheme": {
        "num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}}, per_channel=True, kv_scales=kv_scales)
    with caplog.at_level("INFO", logger="fitserve"):
        tiny_llm(folder)  # a bf16 cache has no use for them: said once
    assert "carries calibrated KV-cache scales; --kv-cache-dtype fp8 would use them" in caplog.text
    llm = tiny_llm(folder, kv_cache_dtype="fp8")
    attns = [layer.self_attn.attn for layer in llm.engine.runner.model.layers]
    assert [(a.k_scale, a.v_scale) for a in attns] == [(0.5, 0.25), (1.0, 1.0), (2.0, 1.0)]
    assert all(len(o.token_ids) == 8 for o in llm.generate(PROMPTS, GREEDY_8))


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}, "block-wise"),
    ({"quant_method": "gptq", "bits": 3}, "3-bit"),  # 4- and 8-bit ones are served (tests/test_int_quant.py)
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({**CHANNEL_DYNAMIC, "config_groups": {"group_0": {  # integer weights, but not packed as compressed-tensors packs them
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}}, "reads 'pack-quantized'"),
    ({**CHANNEL_DYNAMIC, "config_groups": {"a": {}, "b": {}}}, "2 config groups"),
    ({**CHANNEL_DYNAMIC, "quantization_status": "frozen"}, "state 'frozen'"),
    ({**CHANNEL_DYNAMIC, "config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128}}}}, "'group' weight"),
])
def test_unsupported_quantization_configs_are_refused_by_name(dense_folder, tmp_path, config, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    dense_config = json.loads((dense_folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**dense_config, "quantization_config": config}))
    with pytest.raises(ConfigError, match=message):
        resolve_model_source(EngineConfig(model=str(folder)))


def test_the_flag_picks_among_what_the_scales_allow():
    channel = parse_quantization_config({"quantization_config": CHANNEL_DYNAMIC})
    static = parse_quantization_config({"quantization_config": TENSOR_STATIC})
    weights_only = CheckpointFp8("compressed-tensors", "channel", "none", kv_cache_scales=False)
    assert parse_quantization_config({}) is None and resolve_quantization("fp8", None) == "fp8"
    assert resolve_quantization(None, channel) == resolve_quantization("fp8", channel) == "fp8"
    assert resolve_quantization(None, weights_only) == "fp8"
    assert resolve_quantization(None, static) == "fp8_per_tensor" and resolve_quantization("fp8", static) == "fp8"
    assert resolve_quantization("fp8_per_tensor", parse_quantization_config(
        {"quantization_config": TENSOR_DYNAMIC})) == "fp8_per_tensor"  # input scales calibrated at start-up
    with pytest.raises(ConfigError, match="one scale per output channel"):
        resolve_quantization("fp8_per_tensor", channel)


def test_broken_checkpoints_fail_with_the_layer_named(dense_folder, tmp_path):
    folder = write_fp8_checkpoint(dense_folder, tmp_path / "fp8", CHANNEL_DYNAMIC, per_channel=True)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"layers\.1\.mlp\.gate_up_proj: shards \[1\] incomplete"):
        load(folder)
    tensors = load_file(dense_folder / "model.safetensors")
    tensors["lm_head.weight"], tensors["lm_head.weight_scale"] = fp8.quantize_per_tensor(tensors["lm_head.weight"])
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError, match="lm_head"):
        load(folder)
    static = write_fp8_checkpoint(dense_folder, tmp_path / "static", TENSOR_STATIC, per_channel=False)
    with pytest.raises(ConfigError, match="declares static input scales, but 12 layers have none"):
        load(static)
    tensors = load_file(static / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].float().to(torch.float8_e5m2)
    save_file(tensors, str(static / "model.safetensors"))
    with pytest.raises(ConfigError, match="down_proj.weight: shard 0 is torch.float8_e5m2"):
        load(static)
    fresh = write_fp8_checkpoint(dense_folder, tmp_path / "fresh", CHANNEL_DYNAMIC, per_channel=True)
    source = resolve_model_source(EngineConfig(model=str(fresh)))
    with pytest.raises(ConfigError, match="an fp8 checkpoint needs --quantization fp8"):
        load_model(replace(source, checkpoint_fp8=None), torch.float32, CPU, progress=False)  # no fp8 layers


def test_plan_counts_an_fp8_checkpoint_as_fp8_without_the_flag(dense_folder, tmp_path, capsys):
    folder = write_fp8_checkpoint(dense_folder, tmp_path / "fp8", CHANNEL_DYNAMIC, per_channel=True)
    assert main(["plan", "--model", str(folder), "--gpu-memory", "8GiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["settings"]["quantization"] == "fp8" and plan["weights"]["linear_dtype"] == "fp8"
    assert main(["plan", "--model", str(folder), "--gpu-memory", "8GiB", "--users", "4", "--context", "256",
                 "--json"]) == 0
    options = json.loads(capsys.readouterr().out)["options"]
    assert [(o["quantization"], o["kv_cache_dtype"]) for o in options] == [("fp8", "auto"), ("fp8", "fp8")]


def test_check_quant_compares_an_fp8_checkpoint_with_its_original(dense_folder, tmp_path, capsys):
    """With --reference-model the checkpoint is checked against the bf16/fp16 weights it came from: here
    the same figures as online fp8 of the original, since the bytes are the same."""
    folder = write_fp8_checkpoint(dense_folder, tmp_path / "fp8", CHANNEL_DYNAMIC, per_channel=True)
    config = EngineConfig(model=str(folder), dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="no float32 weights to compare with. Give .* as --reference-model"):
        run_check(config)
    prompts = ("The capital of France is", "def add(a, b):")
    stored = run_check(config, max_new_tokens=6, prompts=prompts, reference_model=str(dense_folder))
    online = run_check(EngineConfig(model=str(dense_folder), dtype="float32", device="cpu", quantization="fp8"),
                       max_new_tokens=6, prompts=prompts)
    assert stored.to_json()["prompts"] == online.to_json()["prompts"] and stored.top1_agreement > 0.5
    assert stored.reference.endswith(f"({dense_folder})") and stored.quantized.startswith("weights fp8")
    assert main(["check-quant", "--model", str(folder), "--reference-model", str(dense_folder), "--dtype", "float32",
                 "--device", "cpu", "--num-prompts", "1", "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantized"].startswith("weights fp8")
    other = write_tiny_llama(tmp_path / "other", hidden_size=32)
    with pytest.raises(ConfigError, match="not the same model.*hidden_size"):
        run_check(config, reference_model=str(other))


def test_openai_client_gets_completions_from_an_fp8_checkpoint(dense_folder, tmp_path, caplog):
    """What a user does: serve the folder with no --quantization, ask with the openai client."""
    import openai
    from server_fixtures import live_server

    from fitserve.engine.async_engine import AsyncEngine
    from fitserve.startup import build_engine
    from fitserve.server.app import build_app

    folder = write_fp8_checkpoint(dense_folder, tmp_path / "fp8", TENSOR_STATIC, per_channel=False,
                                  input_scales=True)
    config = EngineConfig(model=str(folder), dtype="float32", device="cpu",
                          cache=CacheConfig(kv_cache_memory_bytes=8 << 20))
    with caplog.at_level("INFO", logger="fitserve"):
        built = build_engine(config, progress=False)
    assert "fp8 checkpoint: e4m3 weights, per-tensor scales, static input scales: serving it as " \
           "--quantization fp8_per_tensor" in caplog.text
    assert "calibrated" not in caplog.text
    from fitserve.server.ui.info import startup_info
    assert startup_info(built.memory, config)["settings"]["quantization"] == "fp8_per_tensor"  # the /ui page
    engine = AsyncEngine(built.engine, "fp8-tiny", built.tokenizer).start()
    try:
        with live_server(build_app(engine)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
            assert [m.id for m in client.models.list().data] == ["fp8-tiny"]
            out = client.completions.create(model="fp8-tiny", prompt="hello", max_tokens=5, temperature=0)
            assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    finally:
        engine.shutdown()


def test_verify_quantization_skips_an_fp8_checkpoint_with_a_warning(dense_folder, tmp_path, caplog):
    from fitserve.quantcheck.check import verify_at_startup

    folder = write_fp8_checkpoint(dense_folder, tmp_path / "fp8", CHANNEL_DYNAMIC, per_channel=True)
    with caplog.at_level("WARNING", logger="fitserve"):
        assert verify_at_startup(EngineConfig(model=str(folder), device="cpu")) is None
    assert "no unquantized weights to compare with" in caplog.text
