"""The built-in page's server side (server/ui/): routes, headers, keys, --disable-ui, /ui/api/info,
and that the files ship in the package. The page itself is tested in a browser: test_ui_browser.py."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fake_engine import FakeEngine
from plan_helpers import llama_8b_inputs
from reliability_helpers import make_engine

from fitserve.cli import build_parser, server_config_from_args
from fitserve.config import EngineConfig, ServerConfig
from fitserve.plan.planner import PlanInputs, plan_memory
from fitserve.plan.shapes import counts_from_arch
from fitserve.server.app import build_app
from fitserve.server.ui import ASSET_TYPES, CONTENT_SECURITY_POLICY
from fitserve.server.ui.info import startup_info

ROOT = Path(__file__).resolve().parents[1]
STATIC = resources.files("fitserve.server.ui").joinpath("static")


@pytest.fixture(scope="module")
def engine():
    engine = make_engine(num_blocks=64, block_size=4)
    yield engine
    engine.shutdown()


def client_for(engine=None, **config) -> TestClient:
    return TestClient(build_app(engine, config=ServerConfig(**config)))


@pytest.mark.parametrize("path", ["/", "/ui"])
def test_the_page_is_served_with_a_strict_policy(engine, path):
    resp = client_for(engine).get(path)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert resp.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "connect-src 'self'" in CONTENT_SECURITY_POLICY and "default-src 'none'" in CONTENT_SECURITY_POLICY
    assert 'data-auth="{&quot;api_key&quot;: false, &quot;metrics_key&quot;: false}"' in resp.text
    for asset in re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', resp.text):
        assert client_for(engine).get(asset).status_code == 200


def test_the_page_says_which_keys_it_needs_and_nothing_more():
    page = client_for(api_keys=("secret-1",), metrics_api_key="secret-2").get("/").text
    assert "api_key&quot;: true" in page and "metrics_key&quot;: true" in page
    assert "secret-1" not in page and "secret-2" not in page


def test_assets_have_their_types_and_nothing_else_is_served(engine):
    client = client_for(engine)
    for name, media_type in ASSET_TYPES.items():
        resp = client.get(f"/ui/static/{name}")
        assert resp.status_code == 200 and resp.headers["content-type"] == media_type
        assert resp.headers["x-content-type-options"] == "nosniff"
    for name in ("index.html", "..%2F__init__.py", "info.py", "nope.js"):
        resp = client.get(f"/ui/static/{name}")
        assert resp.status_code == 404 and resp.json()["error"]["type"] == "NotFoundError"


def test_no_file_of_the_page_refers_to_another_origin():
    for entry in STATIC.iterdir():
        text = entry.read_text(encoding="utf-8")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.IGNORECASE), entry.name
        assert "localStorage" not in text and "sessionStorage" not in text and "document.cookie" not in text


def test_every_page_file_is_package_data():
    """The wheel must carry the page: pyproject's package-data covers every file under static/."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    covered = patterns["fitserve.server.ui"]
    names = sorted(entry.name for entry in STATIC.iterdir())
    assert set(names) == {*ASSET_TYPES, "index.html"}
    assert all(any(fnmatch.fnmatch(f"static/{name}", pattern) for pattern in covered) for name in names)


def test_info_before_the_engine_has_loaded():
    resp = client_for().get("/ui/api/info")
    assert resp.status_code == 200
    body = resp.json()
    assert body["phase"] == "starting" and body["model"] is None and body["memory"] is None


def test_info_names_the_model_and_its_capacity(engine):
    body = client_for(engine).get("/ui/api/info").json()
    assert body["phase"] == "ready" and body["model"] == "fake-real" and body["version"]
    assert body["engine"] == {"max_model_len": 256, "max_num_seqs": 8, "block_size": 4, "num_kv_blocks": 64,
                              "kv_capacity_tokens": 256}
    assert body["memory"] is None and body["settings"] == {}  # no start-up record: not started by fitserve serve
    assert body["process_resident_bytes"] is None or body["process_resident_bytes"] > 0


def test_info_follows_the_metrics_key_else_the_api_key(engine):
    api_only = client_for(engine, api_keys=("api-key",))
    assert api_only.get("/ui/api/info").status_code == 401  # as /metrics: the API key without --metrics-api-key
    assert api_only.get("/ui/api/info", headers={"Authorization": "Bearer api-key"}).status_code == 200
    guarded = client_for(engine, api_keys=("api-key",), metrics_api_key="metrics-key")
    assert guarded.get("/").status_code == 200  # the page itself holds no data
    for headers in ({}, {"Authorization": "Bearer api-key"}, {"Authorization": "Bearer metrics-ke"}):
        resp = guarded.get("/ui/api/info", headers=headers)
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        assert resp.json()["error"]["code"] == "invalid_api_key"
    assert guarded.get("/ui/api/info", headers={"Authorization": "bearer metrics-key"}).status_code == 200


def test_disable_ui_serves_no_page(engine):
    client = client_for(engine, enable_ui=False)
    for path in ("/", "/ui", "/ui/static/app.js", "/ui/api/info"):
        assert client.get(path).status_code == 404
    assert client.get("/metrics").status_code == 200 and client.get("/health").status_code == 200


def test_the_flag():
    parser = build_parser()
    assert server_config_from_args(parser.parse_args(["serve"])).enable_ui is True
    assert server_config_from_args(parser.parse_args(["serve", "--disable-ui"])).enable_ui is False


def test_fake_engines_without_stats_still_get_info():
    body = client_for(FakeEngine()).get("/ui/api/info").json()
    assert body["model"] == "fake-model" and body["engine"]["kv_capacity_tokens"] is None


class CpuRecord:
    """What `fitserve serve` keeps on the CPU: the plan, and nothing measured."""

    def __init__(self, plan) -> None:
        self.planned = plan

    def to_json(self) -> dict:
        from fitserve.runner.memory import StartupMemory  # torch: only the test imports it

        return StartupMemory(planned=self.planned).to_json()


def test_startup_info_on_the_cpu_shows_the_plan_and_the_kv_cache():
    inputs = llama_8b_inputs()
    cpu = PlanInputs(arch=inputs.arch, model_name="m", param_counts=counts_from_arch(inputs.arch),
                     max_model_len=8192, kv_cache_memory_bytes=2**30, cuda_graphs=False)
    info = startup_info(CpuRecord(plan_memory(cpu)), EngineConfig())
    memory = info["memory"]
    assert memory["on_gpu"] is False and memory["gpu_name"] is None
    rows = {row["name"]: row for row in memory["rows"]}
    assert list(rows) == ["weights", "activation peak", "runtime outside torch", "CUDA-graph pool", "KV cache"]
    assert rows["weights"]["planned_bytes"] > 14 * 2**30 and rows["weights"]["actual_bytes"] is None
    assert rows["KV cache"]["actual_bytes"] == 2**30  # 8192 tokens of 128 KiB
    assert memory["kv_tokens"] == {"planned": 8192, "actual": 8192} and memory["kv_bytes_per_token"] == 128 * 2**10
    assert info["settings"]["device"] == "cpu" and info["settings"]["max_num_seqs"] == 256


def test_startup_info_on_a_gpu_compares_planned_and_measured():
    from fitserve.runner.memory import DeviceMemory, StartupMemory

    plan = plan_memory(llama_8b_inputs())
    record = StartupMemory(planned=plan, weights_bytes=plan.breakdown.weights_bytes, activation_peak_bytes=2**28,
                           runtime_non_torch_bytes=2**26, cuda_graph_bytes=2**25)
    record.start = DeviceMemory(20 * 2**30, 19 * 2**30, 0, 0)
    record.end = DeviceMemory(20 * 2**30, 2 * 2**30, 0, 0)
    memory = startup_info(record, EngineConfig())["memory"]
    rows = {row["name"]: row for row in memory["rows"]}
    assert rows["activation peak"]["actual_bytes"] == 2**28 and rows["CUDA-graph pool"]["actual_bytes"] == 2**25
    assert rows["outside the budget (CUDA context, other processes)"]["actual_bytes"] == 2**30
    assert memory["used_after_startup_bytes"] == 17 * 2**30 and memory["free_after_startup_bytes"] == 2 * 2**30
    assert memory["gpu_name"] == "RTX 4000 Ada" and memory["on_gpu"] is True
