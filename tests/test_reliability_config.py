"""`fitserve serve` flags for reliability and exposure: parsing, vLLM's spellings, and the
exit code 2 with a one-line message for a setting that cannot work (before anything loads)."""

from __future__ import annotations

import pytest

from fitserve.cli import build_parser, main, server_config_from_args
from fitserve.config import API_KEY_ENV, DEFAULT_MAX_REQUEST_BODY_BYTES, DEFAULT_SHUTDOWN_TIMEOUT_S, ServerConfig


def config_of(*flags: str) -> ServerConfig:
    return server_config_from_args(build_parser().parse_args(["serve", *flags]))


def test_defaults(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    config = config_of()
    assert config.api_keys == () and config.metrics_api_key is None
    assert config.allowed_origins == ("*",) and not config.allow_credentials
    assert config.request_timeout_s is None and config.max_queue_len is None
    assert config.max_request_body_bytes == DEFAULT_MAX_REQUEST_BODY_BYTES
    assert config.shutdown_timeout_s == DEFAULT_SHUTDOWN_TIMEOUT_S and not config.enable_log_requests


def test_every_flag(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    config = config_of(
        "--api-key", "k1", "k2", "--api-key", "k3", "--metrics-api-key", "m",
        "--allowed-origins", '["https://a.example", "https://b.example"]', "--allowed-methods", "GET", "POST",
        "--allowed-headers", "authorization", "--allow-credentials", "--request-timeout", "30",
        "--max-queue-len", "64", "--max-request-body-bytes", "1MiB", "--shutdown-timeout", "5",
        "--enable-log-requests", "--max-log-len", "100",
    )
    assert config.api_keys == ("k1", "k2", "k3")  # flags win over FITSERVE_API_KEY
    assert config.metrics_api_key == "m"
    assert config.allowed_origins == ("https://a.example", "https://b.example")
    assert config.allowed_methods == ("GET", "POST") and config.allowed_headers == ("authorization",)
    assert config.allow_credentials and config.request_timeout_s == 30 and config.max_queue_len == 64
    assert config.max_request_body_bytes == 2**20 and config.shutdown_timeout_s == 5
    assert config.enable_log_requests and config.max_log_len == 100


def test_request_caps():
    defaults = config_of()
    assert (defaults.max_n, defaults.max_prompts_per_request, defaults.max_choices_per_request,
            defaults.max_prompt_tokens_per_request) == (128, 256, 256, 262_144)
    config = config_of("--max-n", "4", "--max-prompts-per-request", "8", "--max-choices-per-request", "16",
                       "--max-prompt-tokens-per-request", "1000")
    assert (config.max_n, config.max_prompts_per_request, config.max_choices_per_request,
            config.max_prompt_tokens_per_request) == (4, 8, 16, 1000)


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "env-key")
    assert config_of().api_keys == ("env-key",)


@pytest.mark.parametrize("flags, named", [
    (["--request-timeout", "0"], "--request-timeout"),
    (["--max-queue-len", "-1"], "--max-queue-len"),
    (["--max-request-body-bytes", "10"], "--max-request-body-bytes"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
    (["--allowed-origins", "[not json"], "JSON"),
    (["--api-key", ""], "--api-key"),
    (["--max-n", "0"], "--max-n"),
    (["--max-prompt-tokens-per-request", "0"], "--max-prompt-tokens-per-request"),
])
def test_impossible_settings_exit_2_before_loading(flags, named, capsys):
    assert main(["serve", *flags]) == 2
    assert named in capsys.readouterr().err
