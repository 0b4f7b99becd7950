"""GPU telemetry with a fake NVML: readings and units, device selection, energy, throttle time,
the slowdown warnings and the stats line, and the thread (docs/telemetry.md)."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace

import pytest
from fake_nvml import FakeGpu, FakeNvml, ManualClock

from fitserve.core.engine_stats import EngineStats
from fitserve.core.kv_cache_manager import PrefixCacheStats
from fitserve.telemetry import Telemetry, load_nvml
from fitserve.telemetry.monitor import LoadMonitor
from fitserve.telemetry.nvml import GpuDevice, GpuSample, open_device, read_sample, select_devices
from fitserve.telemetry.sampler import ENERGY_FROM_COUNTER, ENERGY_FROM_POWER, GpuSampler
from fitserve.testing import idle_engine_stats

BUSY = idle_engine_stats(num_requests_running=8, num_requests_waiting=2, kv_cache_used_fraction=0.25)
IDLE = replace(BUSY, num_requests_running=0, num_requests_waiting=0)


def with_more_tokens(stats: EngineStats, generated: int, prompted: int) -> EngineStats:
    metrics = stats.metrics
    return replace(stats, metrics=replace(metrics, generation_tokens_total=metrics.generation_tokens_total + generated,
                                          prompt_tokens_total=metrics.prompt_tokens_total + prompted))


def test_a_reading_in_fitserve_units():
    nvml = FakeNvml([FakeGpu(power_mw=412_345, energy_mj=5_000_500, temperature_c=71, sm_mhz=1755, util_gpu=97,
                             util_mem=64, reasons=("sw_power_cap", "sync_boost"))])
    device = open_device(nvml, 0)
    assert (device.name, device.max_sm_clock_mhz, device.slowdown_temperature_c) == ("NVIDIA Fake 80GB", 1980, 87)
    s = read_sample(nvml, device, now_s=5.0)
    assert s.power_w == pytest.approx(412.345) and s.power_limit_w == 700.0
    assert s.energy_counter_j == pytest.approx(5000.5) and s.temperature_c == 71
    assert (s.sm_clock_mhz, s.memory_clock_mhz, s.utilization_pct, s.memory_busy_pct) == (1755, 2619, 97, 64)
    assert (s.memory_used_bytes, s.memory_total_bytes) == (70 * 2**30, 80 * 2**30)
    assert s.throttle_reasons == ("sw_power_cap", "sync_boost") and s.active_slowdowns == s.throttle_reasons


def test_a_field_the_card_lacks_is_none_and_never_asked_again():
    gpu = FakeGpu(unsupported={"nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetCurrentClocksEventReasons"})
    nvml = FakeNvml([gpu])
    device = open_device(nvml, 0)
    for i in range(3):
        s = read_sample(nvml, device, now_s=float(i))
    assert s.energy_counter_j is None and s.throttle_reasons is None and s.active_slowdowns == ()
    assert s.power_w == 60.0  # the rest is still read
    assert device.unsupported == {"energy", "throttle_reasons"}
    assert nvml.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1
    assert nvml.calls["nvmlDeviceGetPowerUsage"] == 3


def test_devices_are_chosen_by_uuid_or_index():
    gpus = [FakeGpu(uuid=f"GPU-aaaa-{i}", name=f"card {i}") for i in range(3)]
    nvml = FakeNvml(gpus)
    assert [d.index for d in select_devices(nvml, ["aaaa-2"])] == [2]          # torch's bare UUID
    assert [d.index for d in select_devices(nvml, ["GPU-AAAA-1", 0, 0])] == [1, 0]
    untouched = FakeNvml(gpus)
    assert select_devices(untouched, []) == [] and untouched.calls == {}  # no GPU in use: NVML not asked


def test_an_unknown_gpu_id_is_logged_and_skipped(caplog):
    with caplog.at_level(logging.WARNING):
        assert select_devices(FakeNvml(), ["GPU-nope", 7]) == []
    assert "no NVML device matches 'GPU-nope'" in caplog.text and "matches 7" in caplog.text


def test_without_the_package_or_a_driver_nothing_is_sampled_and_nothing_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert load_nvml() is None
    telemetry = Telemetry(nvml_loader=load_nvml, stats_interval_s=None).start(lambda: BUSY, ["GPU-x"])
    assert telemetry.snapshot() == [] and telemetry.devices == [] and telemetry._thread is None
    telemetry.stop()


def test_a_machine_without_a_driver_turns_telemetry_off(monkeypatch, caplog):
    class NoDriver:
        class NVMLError(Exception):
            pass

        def nvmlInit(self):
            raise self.NVMLError("Driver Not Loaded")

    monkeypatch.setitem(sys.modules, "pynvml", NoDriver())
    with caplog.at_level(logging.INFO):
        assert load_nvml() is None
    assert "GPU telemetry is off: NVML did not start (Driver Not Loaded)." in caplog.text


def test_no_gpu_in_use_means_nvml_is_never_loaded():
    loads = []
    telemetry = Telemetry(nvml_loader=lambda: loads.append(1), stats_interval_s=None).start(None, [])
    assert loads == [] and telemetry.snapshot() == []
    telemetry.stop()


def test_energy_comes_from_the_counter_since_sampling_began():
    nvml = FakeNvml([FakeGpu(energy_mj=9_000_000)])
    sampler = GpuSampler(nvml, select_devices(nvml, [0]))
    sampler.sample(0.0)
    nvml.gpus[0].energy_mj += 2_500_000  # 2.5 kJ later
    snap = sampler.snapshot()[0]
    assert snap.energy_source == ENERGY_FROM_COUNTER and snap.energy_j == pytest.approx(2500.0)
    nvml.gpus[0].energy_mj += 500_000  # read at snapshot time, not at the last sample
    assert sampler.snapshot()[0].energy_j == pytest.approx(3000.0)


def test_without_a_counter_energy_is_the_integral_of_power():
    nvml = FakeNvml([FakeGpu(unsupported={"nvmlDeviceGetTotalEnergyConsumption"})])
    sampler = GpuSampler(nvml, select_devices(nvml, [0]))
    for t, watts in ((0.0, 100), (1.0, 300), (2.0, 300), (10.0, 300)):  # the 8 s gap is not integrated
        nvml.gpus[0].power_mw = watts * 1000
        sampler.sample(t)
    snap = sampler.snapshot()[0]
    assert snap.energy_source == ENERGY_FROM_POWER and snap.energy_j == pytest.approx(200.0 + 300.0)


def test_throttle_seconds_accumulate_per_reason():
    nvml = FakeNvml()
    sampler = GpuSampler(nvml, select_devices(nvml, [0]))
    for t, reasons in ((0.0, ("gpu_idle",)), (1.0, ("sw_power_cap",)), (2.0, ("sw_power_cap",)), (3.0, ())):
        nvml.gpus[0].reasons = reasons
        sampler.sample(t)
    assert sampler.snapshot()[0].throttle_s == {"gpu_idle": 1.0, "sw_power_cap": 2.0}


# -- warnings and the stats line -------------------------------------------------------------------


def device(**kw) -> GpuDevice:
    return GpuDevice(0, None, "NVIDIA Fake 80GB", "GPU-0", max_sm_clock_mhz=1980, slowdown_temperature_c=87, **kw)


def sample(t: float, sm: float = 1980, reasons=(), temp: float = 60, power: float = 500) -> GpuSample:
    return GpuSample(time_s=t, power_w=power, power_limit_w=700, temperature_c=temp, sm_clock_mhz=sm,
                     throttle_reasons=tuple(reasons))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_throttle_reason_under_load_is_explained(caplog):
    monitor, gpu = LoadMonitor(), device()
    with caplog.at_level(logging.INFO, logger="fitserve.telemetry"):
        monitor.tick(0.0, BUSY, [(gpu, sample(0.0))])
        monitor.tick(1.0, BUSY, [(gpu, sample(1.0, sm=1500, reasons=("hw_thermal_slowdown",), temp=88))])
    (message,) = warnings_of(caplog)
    assert message.startswith("GPU 0 (NVIDIA Fake 80GB) is slowing down under load: thermal throttling")
    assert "88 °C (it slows down at 87 °C)" in message and "SM clock 1,500 MHz" in message
    assert "24% below its peak of 1,980 MHz" in message and "Tokens per second drop" in message


def test_a_clock_drop_without_a_reason_warns_too(caplog):
    monitor, gpu = LoadMonitor(), device()
    with caplog.at_level(logging.WARNING, logger="fitserve.telemetry"):
        for t in range(5):
            monitor.tick(float(t), BUSY, [(gpu, sample(float(t), sm=1980))])
        monitor.tick(5.0, BUSY, [(gpu, sample(5.0, sm=1800))])  # 9% below: not yet
        assert warnings_of(caplog) == []
        monitor.tick(6.0, BUSY, [(gpu, sample(6.0, sm=1700))])  # 14% below
    (message,) = warnings_of(caplog)
    assert "NVML gives no throttle reason" in message and "14% below its peak of 1,980 MHz" in message


def test_idle_is_quiet(caplog):
    monitor, gpu = LoadMonitor(), device()
    with caplog.at_level(logging.INFO, logger="fitserve.telemetry"):
        monitor.tick(0.0, BUSY, [(gpu, sample(0.0, sm=1980))])
        for t in range(1, 30):  # the engine is idle: clocks and reasons may do anything, and no stats line
            monitor.tick(float(t), IDLE, [(gpu, sample(float(t), sm=345, reasons=("gpu_idle", "sw_power_cap")))])
        # busy again, but the GPU waits between steps (idle reason): low clocks are not a slowdown
        monitor.tick(31.0, BUSY, [(gpu, sample(31.0, sm=600, reasons=("gpu_idle",)))])
    assert warnings_of(caplog) == []
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Engine:")]
    assert len(lines) == 1  # for the interval with the busy tick; none for the idle ones after it


def test_a_lasting_slowdown_is_said_once_a_minute_and_its_end_once(caplog):
    monitor, gpu = LoadMonitor(), device()
    capped = ("sw_power_cap",)
    with caplog.at_level(logging.INFO, logger="fitserve.telemetry"):
        for t in range(125):  # power capping that flickers every other second, for two minutes
            monitor.tick(float(t), BUSY, [(gpu, sample(float(t), reasons=capped if t % 2 else ()))])
        for t in range(125, 135):
            monitor.tick(float(t), BUSY, [(gpu, sample(float(t)))])
    assert len(warnings_of(caplog)) == 3  # t = 1, 61, 121
    assert "the power cap" in warnings_of(caplog)[0] and "drawing 500 W (averaged over about a second) of its 700 W limit" in warnings_of(caplog)[0]
    back = [r.getMessage() for r in caplog.records if "back to full speed" in r.getMessage()]
    assert len(back) == 1 and "SM 1,980 MHz" in back[0]


def test_a_new_reason_is_said_at_once(caplog):
    monitor, gpu = LoadMonitor(), device()
    with caplog.at_level(logging.WARNING, logger="fitserve.telemetry"):
        monitor.tick(0.0, BUSY, [(gpu, sample(0.0, reasons=("sw_power_cap",)))])
        monitor.tick(1.0, BUSY, [(gpu, sample(1.0, reasons=("sw_power_cap",)))])
        monitor.tick(2.0, BUSY, [(gpu, sample(2.0, reasons=("sw_power_cap", "sw_thermal_slowdown"), temp=90))])
    assert len(warnings_of(caplog)) == 2 and "too hot" in warnings_of(caplog)[1]


def test_the_stats_line_every_10_s_while_busy(caplog):
    monitor, gpu = LoadMonitor(), device()
    stats = IDLE
    with caplog.at_level(logging.INFO, logger="fitserve.telemetry"):
        for t in range(41):
            if t == 12:
                stats = BUSY
            if t > 12:
                stats = with_more_tokens(stats, generated=300, prompted=1000)
            if t == 25:
                stats = replace(stats, num_requests_running=0, num_requests_waiting=0)
            monitor.tick(float(t), stats, [(gpu, sample(float(t), power=612.4, temp=66))])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Engine:")]
    # intervals end at t = 10 (idle: no line), 20 (busy), 30 (busy until 25: one more line), 40 (idle: none)
    assert len(lines) == 2
    assert lines[0] == ("Engine: 240.0 output tokens/s, 800.0 prompt tokens/s; 8 running, 2 waiting; "
                        "KV cache 25.0% used | GPU 0: 612 W, 66 °C, SM 1,980 MHz")
    assert lines[1].startswith("Engine: 300.0 output tokens/s") and "0 running, 0 waiting" in lines[1]


def test_the_stats_line_gives_the_prefix_cache_hit_rate_of_its_interval(caplog):
    monitor = LoadMonitor()
    cached = replace(BUSY, enable_prefix_caching=True)
    earlier = replace(cached.metrics, prefix_cache=PrefixCacheStats(queries=1000, hits=900))
    later = replace(cached.metrics, prefix_cache=PrefixCacheStats(queries=1400, hits=1000))
    with caplog.at_level(logging.INFO, logger="fitserve.telemetry"):
        monitor.tick(0.0, replace(cached, metrics=earlier), [])
        monitor.tick(10.0, replace(cached, metrics=later), [])
    assert caplog.records[-1].getMessage().endswith("KV cache 25.0% used; prefix cache hit rate 25.0%")

def test_the_thread_samples_until_stopped_and_survives_a_failing_tick(caplog):
    nvml = FakeNvml([FakeGpu(energy_step_mj=1000)])
    calls = []

    def get_stats():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("engine hiccup")
        return IDLE

    telemetry = Telemetry(nvml_loader=lambda: nvml, interval_s=0.01).start(get_stats, ["GPU-00000000-1111-2222-3333-444444444444"])
    deadline = time.monotonic() + 5.0
    while len(calls) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    telemetry.stop()
    assert len(calls) >= 5 and nvml.shutdowns == 1 and telemetry.snapshot() == []
    assert "GPU telemetry tick failed (RuntimeError: engine hiccup)" in caplog.text


def test_the_first_tick_says_what_the_card_exposes(caplog):
    nvml = FakeNvml([FakeGpu(unsupported={"nvmlDeviceGetTotalEnergyConsumption"})])
    with caplog.at_level(logging.INFO, logger="fitserve.telemetry"):
        telemetry = Telemetry(nvml_loader=lambda: nvml, interval_s=60.0, clock=ManualClock(),
                              stats_interval_s=None).start(None, [0])
        telemetry.stop()
    assert "GPU 0 exposes all but energy; energy from power samples (no energy counter)." in caplog.text
