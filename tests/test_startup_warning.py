"""The default `fitserve serve` prints no WARNING about its own default sizes; sizes the operator
chose that will queue or preempt still get one."""

from __future__ import annotations

import logging

import pytest
import torch

from fitserve.config import CacheConfig, EngineConfig, SchedulerConfig
from fitserve.startup import plan_startup, sizes_chosen
from fitserve.weights.source import resolve_model_source


def test_only_chosen_sizes_count_as_chosen():
    assert not sizes_chosen(EngineConfig())
    assert sizes_chosen(EngineConfig(scheduler=SchedulerConfig(max_num_seqs=512)))
    assert sizes_chosen(EngineConfig(cache=CacheConfig(kv_cache_memory_bytes=2**20)))


@pytest.mark.parametrize("config, level", [
    (EngineConfig(), None),
    (EngineConfig(cache=CacheConfig(kv_cache_memory_bytes=64 * 2**20), scheduler=SchedulerConfig(max_model_len=512)),
     logging.WARNING),
])
def test_the_concurrency_note_is_a_warning_only_for_chosen_sizes(caplog, config, level):
    source = resolve_model_source(config)
    caplog.set_level(logging.INFO, logger="fitserve.startup")
    max_model_len = config.scheduler.max_model_len or source.arch.max_position_embeddings
    plan_startup(config, source, max_model_len, torch.device("cpu"))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    if level is None:
        assert warnings == [], [r.getMessage() for r in warnings]
    else:
        assert any("--max-num-seqs" in r.getMessage() for r in warnings)
