"""The flag declarations (config.py field metadata, fitserve/flags.py): every flag parses into its field,
for `fitserve serve` and `fitserve plan`, and the two commands refuse the same settings alike."""

from __future__ import annotations

import dataclasses

import pytest

from fitserve import cli
from fitserve.config import ConfigError, EngineConfig, Flag, ServerConfig
from fitserve.flags import (
    ENGINE_FLAG_GROUPS,
    PLAN_FIELDS,
    SERVER_FLAG_GROUP,
    declared_flags,
    engine_config_from_args,
    server_config_from_args,
)

# Fields the generic rule of _sample cannot give a value the config accepts: the words, and the field's value.
SPECIAL = {
    "dtype": (["float16"], "float16"),
    "device": (["cpu"], "cpu"),
    "kv_cache_dtype": (["fp8"], "fp8"),
    "kv_cache_memory_bytes": (["2GiB"], 2 * 2**30),
    "max_request_body_bytes": (["1MiB"], 2**20),
    "allowed_origins": (['["https://a.example", "https://b.example"]'], ("https://a.example", "https://b.example")),
    "chat_template": (["{{ messages[0].content }}"], "{{ messages[0].content }}"),  # a template, not a file
}
SERVE_CLASSES = [*ENGINE_FLAG_GROUPS, SERVER_FLAG_GROUP]
SERVE_FLAGS = [(cls, f, spec) for _, cls in SERVE_CLASSES for f, spec in declared_flags(cls)]
PLAN_FLAGS = [(cls, f, spec) for cls, f, spec in SERVE_FLAGS if f.name in PLAN_FIELDS]
ENGINE_FLAGS = [(cls, f, spec) for cls, f, spec in SERVE_FLAGS if cls is not ServerConfig]


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def _sample(field: dataclasses.Field, spec: Flag) -> tuple[list[str], object]:
    """Command-line words that set `field` to a value other than its default, and that value."""
    name, default = spec.names[0], _default(field)
    if field.name in SPECIAL:
        words, value = SPECIAL[field.name]
        return [name, *words], value
    if spec.kind == "switch":
        return [name], True
    if spec.kind == "disable":
        return [name], False
    if spec.kind == "on_off":
        return ([f"--no-{name[2:]}"] if default else [name]), not default
    if spec.kind == "words":
        return [name, "a", "b"], ("a", "b")
    if spec.choices:
        value = next(choice for choice in spec.choices if choice != default)
    elif spec.type is int:
        value = default * 2 if default else 3
    elif spec.type is float:
        value = default / 2 if default else 0.5
    else:
        value = "some-name"
    return [name, str(value)], value


def _field_value(command: str, config_class: type, field: dataclasses.Field, words: list[str]):
    args = cli.build_parser().parse_args([command, *words])
    if config_class is ServerConfig:
        return getattr(server_config_from_args(args), field.name)
    config = engine_config_from_args(args)
    owner = {EngineConfig: config, type(config.cache): config.cache, type(config.scheduler): config.scheduler}
    return getattr(owner[config_class], field.name)


def _ids(flags) -> list[str]:
    return [spec.names[0] for _, _, spec in flags]


@pytest.mark.parametrize(("config_class", "field", "spec"), SERVE_FLAGS, ids=_ids(SERVE_FLAGS))
def test_every_serve_flag_parses_into_its_field(config_class, field, spec):
    words, expected = _sample(field, spec)
    assert expected != _default(field), "the sample must differ from the default, or the test proves nothing"
    assert _field_value("serve", config_class, field, words) == expected


@pytest.mark.parametrize(("config_class", "field", "spec"), PLAN_FLAGS, ids=_ids(PLAN_FLAGS))
def test_every_plan_flag_parses_into_its_field(config_class, field, spec):
    words, expected = _sample(field, spec)
    assert _field_value("plan", config_class, field, words) == expected


@pytest.mark.parametrize(("config_class", "field", "spec"), ENGINE_FLAGS, ids=_ids(ENGINE_FLAGS))
def test_every_check_quant_flag_parses_into_its_field(config_class, field, spec):
    words, expected = _sample(field, spec)
    assert _field_value("check-quant", config_class, field, words) == expected


def test_plan_fields_name_declared_flags():
    declared = {field.name for _, field, _ in SERVE_FLAGS}
    assert PLAN_FIELDS <= declared, PLAN_FIELDS - declared


def test_no_flags_give_the_config_defaults():
    args = cli.build_parser().parse_args(["serve"])
    assert engine_config_from_args(args) == EngineConfig()
    assert server_config_from_args(args) == ServerConfig()
    assert engine_config_from_args(cli.build_parser().parse_args(["plan"])) == EngineConfig()


def test_aliases_and_repeats():
    parse = cli.build_parser().parse_args
    assert engine_config_from_args(parse(["serve", "-tp", "2"])).tensor_parallel_size == 2
    assert engine_config_from_args(parse(["plan", "-tp", "4"])).tensor_parallel_size == 4
    assert server_config_from_args(parse(["serve", "--api-key", "a", "--api-key", "b"])).api_keys == ("a", "b")
    assert server_config_from_args(parse(["serve", "--allowed-origins", "x", "y"])).allowed_origins == ("x", "y")


def test_serve_help_lists_every_declared_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    for _, _, spec in SERVE_FLAGS:
        assert spec.names[0] in text


REFUSED = [
    ["--kv-cache-dtype", "fp8_e5m2"],
    ["--kv-cache-dtype", "int8"],
    ["--block-size", "24"],
    ["--gpu-memory-utilization", "1.5"],
    ["--max-num-seqs", "0"],
    ["--max-num-batched-tokens", "0"],
    ["--max-model-len", "1"],
    ["--tensor-parallel-size", "0"],
    ["--dtype", "int8"],
    ["--kv-cache-memory-bytes", "lots"],
    ["--num-gpu-blocks-override", "0"],
]


@pytest.mark.parametrize("flags", REFUSED, ids=[" ".join(f) for f in REFUSED])
def test_plan_refuses_what_serve_refuses_with_the_same_message(flags, capsys):
    assert cli.main(["serve", *flags]) == 2
    serve_error = capsys.readouterr().err
    assert cli.main(["plan", *flags]) == 2
    plan_error = capsys.readouterr().err
    assert serve_error.startswith("fitserve: ") and serve_error == plan_error


def test_fp8_e5m2_is_refused_with_what_to_use_instead(capsys):
    assert cli.main(["plan", "--kv-cache-dtype", "fp8_e5m2"]) == 2
    error = capsys.readouterr().err
    assert "fp8_e5m2 is not supported" in error and "--kv-cache-dtype fp8" in error


def test_an_invalid_choice_is_refused_alike(capsys):
    for command in ("serve", "plan"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--quantization", "int4"])
        assert exit_info.value.code == 2
        assert "argument --quantization: invalid choice: 'int4'" in capsys.readouterr().err


def test_chat_template_reads_a_file_or_takes_a_template_and_refuses_the_rest(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    assert EngineConfig(chat_template=str(path)).chat_template == path.read_text()
    with pytest.raises(ConfigError, match="no file"):
        EngineConfig(chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ConfigError, match="does not parse"):
        EngineConfig(chat_template="{% for m in messages %}")


def test_vllm_flags_that_change_nothing_are_taken_and_logged(caplog):
    """A deployment's vLLM command line starts fitserve: each such flag is logged with its reason."""
    from fitserve.vllm_flags import VLLM_FLAGS, check_vllm_flags

    words = []
    for flag in VLLM_FLAGS:
        words += [flag.name, flag.only[0] if flag.only else "4"] if flag.takes_value else [flag.name]
    args = cli.build_parser().parse_args(["serve", *words])
    with caplog.at_level("INFO", logger="fitserve.vllm_flags"):
        assert check_vllm_flags(args) == [flag.name for flag in VLLM_FLAGS]
    assert all(any(flag.name in r.getMessage() and flag.note in r.getMessage() for r in caplog.records)
               for flag in VLLM_FLAGS)
    assert engine_config_from_args(args) == EngineConfig()  # none of them touches the engine


@pytest.mark.parametrize("words", [["--pipeline-parallel-size", "2"], ["--tokenizer-mode", "mistral"],
                                   ["--response-role", "user"]])
def test_a_vllm_flag_at_a_value_fitserve_cannot_honour_is_refused(words, capsys):
    assert cli.main(["serve", *words]) == 2
    assert words[0] in capsys.readouterr().err


def test_download_dir_and_revision_reach_the_hub_download(monkeypatch, tmp_path):
    import huggingface_hub

    from fitserve.weights.source import resolve_model_source

    seen = {}

    def snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not here")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ConfigError, match=str(tmp_path)):  # the message names the cache it looked in
        resolve_model_source(EngineConfig(model="org/model", download_dir=str(tmp_path), revision="v2"))
    assert (seen["repo_id"], seen["cache_dir"], seen["revision"]) == ("org/model", str(tmp_path), "v2")
