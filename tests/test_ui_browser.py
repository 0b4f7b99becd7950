"""The built-in page in a real browser: Debian's Chromium, headless, driven by chromedriver (selenium).

Each test starts a live server on 127.0.0.1 over the real AsyncEngine + scheduler with the
fake runner (a few ms per step, so requests last long enough to watch) and the byte-level
tokenizer of fake_engine.py, loads the page and reads it as a person would: the model, the
memory plan, gauges that move under load, a chat answer that streams, a refused key.

Skipped, with the reason, where selenium, chromium or chromedriver is missing (.ci/run installs
them where apt-get works; docs/ui.md).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from fake_engine import EOS_TOKEN_ID, VOCAB_SIZE, FakeTokenizer
from plan_helpers import llama_8b_inputs
from reliability_helpers import SlowRunner
from server_fixtures import live_server

from fitserve.config import EngineConfig, SchedulerConfig, ServerConfig
from fitserve.core.scheduler import SchedulerLimits
from fitserve.engine.async_engine import AsyncEngine
from fitserve.engine.llm_engine import EngineLimits, LLMEngine
from fitserve.plan.planner import plan_memory
from fitserve.server.app import build_app
from fitserve.server.ui.info import startup_info

selenium = pytest.importorskip(
    "selenium", reason="browser tests need selenium (pip install selenium; .ci/run installs it)")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
BROWSER = next((path for path in BROWSERS if os.access(path, os.X_OK)), None)
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.access("/usr/bin/chromedriver", os.X_OK) else None)
pytestmark = pytest.mark.skipif(
    BROWSER is None or DRIVER is None,
    reason="browser tests need Chromium and chromedriver: apt-get install chromium chromium-driver "
           f"(found browser={BROWSER}, driver={DRIVER}); .ci/run installs them where apt-get works")
# The closed network's flags: nothing in the browser may try to reach the internet.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1440,1000")
MODEL = "fake-smol"
STEP_DELAY_S = 0.01  # per engine step: a 150-token answer takes about 1.5 s
WAIT_S = 15.0


def fake_startup_memory():
    """A start-up record as `fitserve serve` keeps it: Llama-3-8B planned on the guide's 20 GB card."""
    from fitserve.runner.memory import DeviceMemory, StartupMemory  # torch: only the test imports it

    plan = plan_memory(llama_8b_inputs(max_num_seqs=32))
    memory = StartupMemory(planned=plan, weights_bytes=plan.breakdown.weights_bytes + 3 * 2**20,
                           activation_peak_bytes=plan.breakdown.activation_peak_bytes - 2**20,
                           runtime_non_torch_bytes=70 * 2**20, cuda_graph_bytes=30 * 2**20)
    memory.start = DeviceMemory(20475 * 2**20, 19800 * 2**20, 0, 0)
    memory.end = DeviceMemory(20475 * 2**20, 1500 * 2**20, 0, 0)
    return memory


def make_engine(max_num_seqs: int = 16) -> AsyncEngine:
    runner = SlowRunner(STEP_DELAY_S, num_blocks=256, block_size=16, vocab_size=VOCAB_SIZE)
    limits = EngineLimits(VOCAB_SIZE, (EOS_TOKEN_ID,), SchedulerLimits(max_num_seqs, 512, 1024))
    engine = AsyncEngine(LLMEngine(runner, FakeTokenizer(), limits), MODEL, FakeTokenizer())
    engine.startup_info = startup_info(fake_startup_memory(), EngineConfig(scheduler=SchedulerConfig(max_num_seqs=max_num_seqs)))
    return engine.start()


@contextmanager
def ui_server(config: ServerConfig | None = None, telemetry=None) -> Iterator[tuple[str, AsyncEngine]]:
    engine = make_engine()
    app = build_app(engine, config=config or ServerConfig())
    app.state.telemetry = telemetry  # as the launcher sets it: fitserve:gpu_* on /metrics
    try:
        with live_server(app) as url:
            yield url, engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[webdriver.Chrome]:
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium-manager stays quiet (and is not run: paths given)
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(predicate: Callable[[], object], timeout_s: float = WAIT_S, what: str = "") -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


def value_of(driver, element_id: str) -> float | None:
    raw = driver.find_element(By.ID, element_id).get_attribute("data-value")
    return None if raw in (None, "") else float(raw)


def severe_console_entries(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def open_page(driver, url: str, path: str = "/") -> None:
    # leave the earlier page first: its refreshes of a server that has stopped log a refused
    # connection, which could land after the log was read and count against this page
    driver.get("about:blank")
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(url + path)
    wait_for(lambda: driver.find_element(By.ID, "phase").text not in ("connecting", ""), what="the first refresh")


@contextmanager
def load(url: str, num_requests: int = 12, max_tokens: int = 150) -> Iterator[None]:
    """`num_requests` streams of `max_tokens` tokens each, in threads, for the length of the block."""
    def one(index: int) -> None:
        body = {"prompt": [65 + index % 26] * 100, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for _ in response.iter_lines():
                pass

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(num_requests)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for thread in threads:
            thread.join(timeout=60)


def send_chat(driver, text: str, max_tokens: int = 24) -> None:
    field = driver.find_element(By.ID, "max_tokens")
    field.clear()
    field.send_keys(str(max_tokens))
    driver.find_element(By.ID, "temperature").clear()
    driver.find_element(By.ID, "temperature").send_keys("0")
    driver.find_element(By.ID, "prompt").send_keys(text, Keys.ENTER)


def last_answer(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def test_page_loads_with_model_settings_and_memory_plan(browser):
    with ui_server() as (url, _):
        open_page(browser, url)
        assert browser.title == "fitserve"
        wait_for(lambda: browser.find_element(By.ID, "model-name").text == MODEL, what="the model name")
        assert browser.find_element(By.ID, "phase").text == "ready"
        settings = browser.find_element(By.ID, "settings").text
        assert "--max-num-seqs 16" in settings and "4,096 tokens = 256 blocks of 16" in settings
        memory = browser.find_element(By.ID, "memory").text
        assert "planned actual" in memory and "weights" in memory and "CUDA-graph pool" in memory
        assert "KV blocks" in memory
        wait_for(lambda: value_of(browser, "v-free") == 4096, what="free KV tokens")
        assert value_of(browser, "v-kv") == 0 and value_of(browser, "v-running") == 0
        assert "512" in browser.find_element(By.ID, "admissible").text
        assert browser.find_element(By.ID, "api-key-box").get_attribute("hidden") is not None  # no key asked
        time.sleep(1.5)  # a few refreshes, then the console must still be clean
        assert severe_console_entries(browser) == []


def test_gauges_move_under_load_and_settle_after(browser):
    with ui_server() as (url, engine):
        open_page(browser, url, "/ui")
        wait_for(lambda: value_of(browser, "v-free") == 4096, what="the idle figures")
        idle_gauge = browser.execute_script("return document.getElementById('gauge-kv').toDataURL()")
        with load(url):
            wait_for(lambda: (value_of(browser, "v-running") or 0) >= 4, what="running requests on the page")
            wait_for(lambda: (value_of(browser, "v-kv") or 0) > 0.2, what="KV-cache usage on the page")
            wait_for(lambda: (value_of(browser, "v-tps") or 0) > 10, what="output tokens/s on the page")
            assert value_of(browser, "v-free") < 4096
            busy_gauge = browser.execute_script("return document.getElementById('gauge-kv').toDataURL()")
            assert busy_gauge != idle_gauge
        wait_for(lambda: value_of(browser, "v-ttft") is not None, what="a TTFT p50")
        wait_for(lambda: value_of(browser, "v-running") == 0 and value_of(browser, "v-free") == 4096,
                 what="the page back to idle")
        assert severe_console_entries(browser) == []


def test_chat_streams_an_answer_with_its_figures(browser):
    with ui_server() as (url, _):
        open_page(browser, url)
        wait_for(lambda: browser.find_element(By.ID, "model-name").text == MODEL, what="the model name")
        send_chat(browser, "hi", max_tokens=24)
        wait_for(lambda: last_answer(browser).find_elements(By.CSS_SELECTOR, ".meta"), what="the answer's figures")
        answer = last_answer(browser)
        # The fake model continues the chat template "<user>hi\n<assistant>" byte by byte: "?@ABC..."
        assert answer.find_element(By.CSS_SELECTOR, ".text").text == "?@ABCDEFGHIJKLMNOPQRSTUV"
        assert int(answer.get_attribute("data-chunks")) > 1  # streamed, not in one piece
        assert float(answer.get_attribute("data-ttft")) > 0 and float(answer.get_attribute("data-tps")) > 0
        meta = answer.find_element(By.CSS_SELECTOR, ".meta").text
        assert "TTFT" in meta and "tokens/s" in meta and "24 tokens" in meta and "finish: length" in meta
        send_chat(browser, "more", max_tokens=5)  # the second turn carries the first as history
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")) == 2, what="turn 2")
        assert severe_console_entries(browser) == []


def test_a_wrong_api_key_shows_an_error_and_the_right_one_works(browser):
    with ui_server(ServerConfig(api_keys=("right-key",))) as (url, _):
        open_page(browser, url)
        key_box = browser.find_element(By.ID, "api-key-box")
        assert key_box.get_attribute("hidden") is None  # the page asks for the key
        browser.find_element(By.ID, "api-key").send_keys("wrong-key")
        send_chat(browser, "hi")
        wait_for(lambda: last_answer(browser).find_elements(By.CSS_SELECTOR, ".meta.error"), what="the error")
        error = last_answer(browser).find_element(By.CSS_SELECTOR, ".meta.error").text
        assert "401" in error and "API key" in error
        assert "failed" in last_answer(browser).get_attribute("class")
        browser.find_element(By.ID, "api-key").clear()
        browser.find_element(By.ID, "api-key").send_keys("right-key")
        send_chat(browser, "hi", max_tokens=3)
        wait_for(lambda: "3 tokens" in last_answer(browser).text, what="the answer with the right key")
        kept = browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
        assert kept == [0, 0, ""]  # the key lives in the page's memory only
        browser.refresh()
        wait_for(lambda: browser.find_element(By.ID, "phase").text == "ready", what="the reloaded page")
        assert browser.find_element(By.ID, "api-key").get_attribute("value") == ""


def test_metrics_key_is_asked_for_when_metrics_are_protected(browser):
    with ui_server(ServerConfig(metrics_api_key="metrics-key")) as (url, _):
        open_page(browser, url)
        wait_for(lambda: "metrics key" in browser.find_element(By.ID, "banner").text, what="the metrics-key banner")
        assert value_of(browser, "v-free") is None
        browser.find_element(By.ID, "metrics-key").send_keys("metrics-key")
        wait_for(lambda: value_of(browser, "v-free") == 4096, what="the figures once the key is given")
        wait_for(lambda: browser.find_element(By.ID, "model-name").text == MODEL, what="the model name")
        wait_for(lambda: not browser.find_element(By.ID, "banner").is_displayed(), what="the banner to go")


def histogram_quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile, for comparison with the page's."""
    total = cumulative[-1][1]
    rank, lower_bound, lower_count = q * total, 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def test_the_page_reads_metrics_as_prometheus_does(browser):
    from prometheus_client.parser import text_string_to_metric_families

    with ui_server() as (url, _):
        with load(url, num_requests=6, max_tokens=20):
            pass
        open_page(browser, url)
        read = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            import("/ui/static/metrics.js").then(async (m) => {
              const families = m.parsePrometheus(await (await fetch("/metrics")).text());
              done({p50: m.quantile(0.5, m.buckets(families, "vllm:time_to_first_token_seconds")),
                    p90: m.quantile(0.9, m.buckets(families, "vllm:time_to_first_token_seconds")),
                    generated: m.first(families, "vllm:generation_tokens_total"),
                    model: families.get("vllm:num_requests_running")[0].labels.model_name,
                    admissible: families.get("fitserve:num_requests_admissible").length});
            });""")
        text = httpx.get(f"{url}/metrics").text
        ttft = next(f for f in text_string_to_metric_families(text) if f.name == "vllm:time_to_first_token_seconds")
        cumulative = [(float(s.labels["le"]), s.value) for s in ttft.samples if s.name.endswith("_bucket")]
        assert read["p50"] == pytest.approx(histogram_quantile(0.5, cumulative))
        assert read["p90"] == pytest.approx(histogram_quantile(0.9, cumulative))
        assert read["generated"] == 120 and read["model"] == MODEL and read["admissible"] == 4


def test_the_gpu_card_shows_telemetry_where_there_is_some(browser):
    from fake_nvml import FakeGpu, FakeNvml

    from fitserve.telemetry import Telemetry

    nvml = FakeNvml([FakeGpu(power_mw=250_000, temperature_c=61, util_gpu=87, reasons=("sw_power_cap",))])
    telemetry = Telemetry(nvml_loader=lambda: nvml, interval_s=0.2, stats_interval_s=None).start(None, [0])
    try:
        with ui_server(telemetry=telemetry) as (url, _):
            open_page(browser, url)
            card = browser.find_element(By.ID, "card-gpu")
            wait_for(card.is_displayed, what="the GPU card")
            text = browser.find_element(By.ID, "gpu-table").text
            assert "NVIDIA Fake 80GB" in text and "250 / 700" in text and "61 / 87" in text
            assert "87%" in text and "70.0 / 80.0" in text and "sw_power_cap" in text
            assert severe_console_entries(browser) == []
        with ui_server() as (url, _):  # no GPU: no card
            open_page(browser, url)
            wait_for(lambda: value_of(browser, "v-free") == 4096, what="the figures")
            assert not browser.find_element(By.ID, "card-gpu").is_displayed()
    finally:
        telemetry.stop()
