"""The command line of the config tree: parsers built from the flags declared on config fields.

Each flag is declared once, on the field it sets (`field(default=..., metadata=flag(...))` in
config.py), with its name, help and the field's default. This module turns those declarations
into argparse arguments and parsed arguments back into config objects, for `fitserve serve`,
`fitserve plan` (a subset: `PLAN_FIELDS`) and `fitserve check-quant`. Torch-free.

Adding a flag: add the field, with its default and `metadata=flag("--its-name", help=...)`, to
EngineConfig, CacheConfig, SchedulerConfig or ServerConfig; every parser that takes that class's
flags has it, and tests/test_flags.py checks that it parses into its field.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection
from typing import Any

from fitserve.config import (
    FLAG_KEY,
    CacheConfig,
    EngineConfig,
    Flag,
    SchedulerConfig,
    ServerConfig,
)

# The flags of `fitserve serve` that set the engine, by class, each class under its own heading.
ENGINE_FLAG_GROUPS: tuple[tuple[str, type], ...] = (
    ("model and engine", EngineConfig),
    ("KV cache", CacheConfig),
    ("scheduling", SchedulerConfig),
)
SERVER_FLAG_GROUP = ("HTTP server", ServerConfig)
# What `fitserve plan` takes of them (field names): what sizes memory, and the model.
PLAN_FIELDS = frozenset({
    "model", "load_format", "dtype", "quantization", "enforce_eager", "tensor_parallel_size",
    "block_size", "gpu_memory_utilization", "kv_cache_memory_bytes", "num_gpu_blocks_override", "kv_cache_dtype",
    "max_model_len", "max_num_seqs", "max_num_batched_tokens",
})


def declared_flags(config_class: type) -> list[tuple[dataclasses.Field, Flag]]:
    """The fields of a config class that have a flag, in field order."""
    return [(f, f.metadata[FLAG_KEY]) for f in dataclasses.fields(config_class) if FLAG_KEY in f.metadata]


def _parser_default(field: dataclasses.Field, spec: Flag) -> Any:
    """What argparse stores when the flag is absent: the field's own default, or None where that comes from
    a factory (the environment) or is a list (None leaves the field at its default; see config_kwargs)."""
    if spec.kind == "disable":
        return False
    if spec.kind == "words" or field.default is dataclasses.MISSING:
        return None
    return field.default


def add_flags(parser: Any, config_class: type, only: Collection[str] | None = None) -> None:
    """Add the flags of `config_class` (those of fields named in `only`, if given) to a parser or group."""
    for field, spec in declared_flags(config_class):
        if only is not None and field.name not in only:
            continue
        options: dict[str, Any] = {"help": spec.help, "default": _parser_default(field, spec)}
        if spec.kind in ("switch", "disable"):
            options["action"] = "store_true"
        elif spec.kind == "on_off":
            options["action"] = argparse.BooleanOptionalAction
        else:
            options.update(type=spec.type, choices=spec.choices, metavar=spec.metavar)
            if spec.kind == "words":
                options.update(nargs="+", action="extend")
        parser.add_argument(*spec.names, **{k: v for k, v in options.items() if v is not None or k == "default"})


def config_kwargs(config_class: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `config_class` that `args` sets. A flag that is absent from the parser, or parsed as None,
    sets nothing: the field keeps its default (so a subset parser such as plan's gets the rest's defaults)."""
    kwargs: dict[str, Any] = {}
    for field, spec in declared_flags(config_class):
        value = getattr(args, spec.dest, None)
        if value is None:
            continue
        if spec.kind == "disable":
            value = not value
        kwargs[field.name] = spec.convert(value) if spec.convert else value
    return kwargs


def add_engine_args(parser: argparse.ArgumentParser, only: Collection[str] | None = None) -> None:
    """The engine flags of `fitserve serve` (all, or the fields named in `only`), one heading per class."""
    for title, config_class in ENGINE_FLAG_GROUPS:
        add_flags(parser.add_argument_group(title), config_class, only)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The one way from parsed flags to an EngineConfig, and so the one validation, for serve, plan and
    check-quant (ConfigError for a setting that cannot work)."""
    return EngineConfig(
        **config_kwargs(EngineConfig, args),
        cache=CacheConfig(**config_kwargs(CacheConfig, args)),
        scheduler=SchedulerConfig(**config_kwargs(SchedulerConfig, args)),
    )


def add_server_config_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """ServerConfig's flags, under their heading (returned, for the serve flags that set no config field)."""
    title, config_class = SERVER_FLAG_GROUP
    group = parser.add_argument_group(title)
    add_flags(group, config_class)
    return group


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**config_kwargs(ServerConfig, args))
