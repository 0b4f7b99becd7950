"""vLLM's `--quantization gptq|awq|compressed-tensors` (and gptq_marlin, awq_marlin) with a real integer
checkpoint: accepted when it names the checkpoint's own method, a ConfigError naming both before any
weight is read when it does not."""

from __future__ import annotations

import pytest
import torch
from plan_helpers import write_model_folder
from test_int_quant import quantized_checkpoint

from fitserve import startup
from fitserve.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from fitserve.layers.formats.int_quant import IntQuantLinear
from fitserve.models.loader import load_model
from fitserve.weights.source import resolve_model_source


@pytest.mark.parametrize("flag,method", [("gptq", "gptq"), ("gptq_marlin", "gptq"), ("awq", "awq"),
                                         ("awq_marlin", "awq"), ("compressed-tensors", "compressed-tensors")])
def test_the_flag_naming_the_checkpoints_method_serves_it(tmp_path, flag, method):
    quantized_checkpoint(tmp_path, method, symmetric=method == "compressed-tensors")
    config = EngineConfig(model=str(tmp_path), quantization=flag)
    assert config.quantization == method  # vLLM's Marlin names read the same checkpoints
    source = resolve_model_source(config)
    model = load_model(source, torch.float32, torch.device("cpu"), progress=False, quantization=config.quantization)
    assert sum(isinstance(m, IntQuantLinear) for m in model.modules()) == 4 * 2


@pytest.fixture
def no_weight_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded although the flag disagrees with the checkpoint")
    monkeypatch.setattr(startup, "load_model", refuse)


@pytest.mark.parametrize("flag", ["awq", "compressed-tensors", "awq_marlin"])
def test_a_flag_that_disagrees_with_the_checkpoint_stops_before_loading(tmp_path, no_weight_loading, flag):
    quantized_checkpoint(tmp_path, "gptq")
    config = EngineConfig(model=str(tmp_path), quantization=flag, device="cpu",
                          cache=CacheConfig(num_gpu_blocks_override=8), scheduler=SchedulerConfig(max_model_len=64))
    with pytest.raises(ConfigError) as info:
        startup.build_engine(config, progress=False)
    message = str(info.value)
    assert f"--quantization {config.quantization} does not match" in message
    assert "its quantization_config is gptq" in message and "Pass --quantization gptq" in message


def test_an_integer_method_for_an_unquantized_model_is_refused(tmp_path):
    folder = write_model_folder(tmp_path / "m")
    with pytest.raises(ConfigError, match="--quantization gptq serves a gptq checkpoint as stored, but .* is not "
                                          "quantized .*--load-format dummy"):
        resolve_model_source(EngineConfig(model=str(folder), quantization="gptq"))


def test_plan_refuses_the_disagreement_too(tmp_path, capsys):
    from fitserve.cli import main

    quantized_checkpoint(tmp_path, "awq")
    assert main(["plan", "--model", str(tmp_path), "--quantization", "gptq_marlin"]) == 2
    assert "--quantization gptq does not match" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path), "--quantization", "awq_marlin", "--json"]) in (0, 1)
    assert '"linear_dtype": "awq"' in capsys.readouterr().out


def test_a_dummy_of_an_integer_checkpoint_keeps_its_scheme(tmp_path):
    """--load-format dummy on a GPTQ folder: random weights in its own scheme (8 bits, act-order here)."""
    quantized_checkpoint(tmp_path, "gptq", bits=8, act_order=True)
    source = resolve_model_source(EngineConfig(model=str(tmp_path), load_format="dummy"))
    assert source.dummy_layout == "gptq" and source.checkpoint_int.bits == 8 and source.checkpoint_int.act_order
    model = load_model(source, torch.float32, torch.device("cpu"), progress=False)
    layer = model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, IntQuantLinear) and sorted(layer.input_order.tolist()) == list(range(64))
    assert not torch.equal(layer.input_order, torch.arange(64, dtype=torch.int32))  # columns sorted by group
    assert torch.isfinite(model.compute_logits(torch.randn(2, 64))).all()
