"""What the samples mean, said in the log: slowdowns under load, and a stats line while busy.

Fed once a tick (about a second) with the engine's `stats()` (an EngineStats) and the GPU
samples of that tick; it owns no thread and reads no clock, so tests drive it with made-up samples.

- A warning when the card holds its clocks down while requests are in flight: a throttle
  reason other than idle, or the SM clock more than CLOCK_DROP_FRACTION below its peak of the
  last PEAK_WINDOW_S seconds of busy readings. It says which reason, the temperature and the
  clock, and that tokens/s drop while it lasts; it repeats at most every WARN_REPEAT_S while
  the same slowdown lasts, and one line says when the clocks are back.
- Every STATS_INTERVAL_S while the engine is busy (or was, since the last line): output and
  prompt tokens/s, requests running and waiting, KV-cache usage, the prefix cache's hit rate
  over the interval (when it is on), and each GPU's power and temperature (vLLM logs the same
  line, without the GPU, every 10 s).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from fitserve.core.engine_stats import EngineStats
from fitserve.telemetry.nvml import GpuDevice, GpuSample

logger = logging.getLogger("fitserve.telemetry")

STATS_INTERVAL_S = 10.0      # vLLM's stats line interval
CLOCK_DROP_FRACTION = 0.10   # the threshold: more than 10% below the recent peak
PEAK_WINDOW_S = 60.0         # "recent": clocks of the last minute of busy readings
WARN_REPEAT_S = 60.0         # a slowdown that lasts (or comes and goes) is said again this often, not every second
RECOVERY_S = 5.0             # busy seconds without a slowdown before "back to full speed" (power capping flickers)
CLOCK_DROP = "clock_drop"    # the cause recorded for a drop below the recent peak

REASON_TEXT = {
    "applications_clocks_setting": "clocks capped by the applications-clocks setting (nvidia-smi -ac)",
    "sw_power_cap": ("the power cap: the card lowers its clocks to keep its power under the limit (peaks of "
                     "milliseconds count, so the averaged reading can be well below it)"),
    "hw_slowdown": "a hardware slowdown (overheating or the power supply's brake signal)",
    "sync_boost": "sync boost: held to the clocks of the slowest GPU of its group",
    "sw_thermal_slowdown": "thermal throttling: the card is too hot and lowers its clocks (driver)",
    "hw_thermal_slowdown": "thermal throttling: the card is too hot and lowers its clocks (hardware)",
    "hw_power_brake_slowdown": "the power brake: the power supply asked the card to slow down",
    "display_clock_setting": "clocks held by the display clock setting",
}


def is_busy(stats: EngineStats | None) -> bool:
    return stats is not None and stats.is_busy


def _mhz(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f} MHz"


def _temperature(sample: GpuSample, device: GpuDevice) -> str:
    if sample.temperature_c is None:
        return "temperature not reported"
    text = f"{sample.temperature_c:.0f} °C"
    if device.slowdown_temperature_c is not None:
        text += f" (it slows down at {device.slowdown_temperature_c:.0f} °C)"
    return text


def _power(sample: GpuSample) -> str:
    if sample.power_w is None:
        return "power not reported"
    limit = "" if sample.power_limit_w is None else f" of its {sample.power_limit_w:.0f} W limit"
    return f"drawing {sample.power_w:.0f} W (averaged over about a second){limit}"


@dataclass(slots=True)
class _GpuWatch:
    busy_clocks: deque = field(default_factory=deque)  # (time_s, SM MHz) of busy readings within PEAK_WINDOW_S
    slowing: bool = False             # a slowdown was warned about and has not cleared yet
    warned_at_s: float | None = None  # the last warning
    warned_causes: frozenset = frozenset()  # its reasons (and CLOCK_DROP)
    clear_since_s: float | None = None  # busy readings without a slowdown since then


class LoadMonitor:
    def __init__(self, stats_interval_s: float = STATS_INTERVAL_S) -> None:
        self.stats_interval_s = stats_interval_s
        self._watches: dict[int, _GpuWatch] = {}
        self._last_line_s: float | None = None
        self._last_tokens: tuple[int, int] | None = None  # (generation, prompt) totals at the last line
        self._last_prefix_cache: tuple[int, int] = (0, 0)  # (queried, hit) prompt tokens at the last line
        self._busy_since_line = False

    def tick(self, now_s: float, stats: EngineStats | None,
             readings: Sequence[tuple[GpuDevice, GpuSample]]) -> None:
        busy = is_busy(stats)
        for device, sample in readings:
            self._check_gpu(now_s, busy, device, sample)
        self._busy_since_line = self._busy_since_line or busy
        if self._last_line_s is None:
            self._start_interval(now_s, stats)
        elif now_s - self._last_line_s >= self.stats_interval_s:
            if self._busy_since_line and stats is not None:
                logger.info("%s", self.stats_line(now_s, stats, readings))
            self._start_interval(now_s, stats)

    def _start_interval(self, now_s: float, stats: EngineStats | None) -> None:
        self._last_line_s = now_s
        self._busy_since_line = False
        if stats is not None:
            self._last_tokens = (stats.num_generation_tokens_total, stats.num_prompt_tokens_total)
            self._last_prefix_cache = (stats.prefix_cache_queried_tokens_total, stats.prefix_cache_hit_tokens_total)

    def stats_line(self, now_s: float, stats: EngineStats, readings: Sequence[tuple[GpuDevice, GpuSample]]) -> str:
        elapsed_s = max(now_s - (self._last_line_s or now_s), 1e-9)
        generated, prompted = self._last_tokens or (0, 0)
        output_tps = (stats.num_generation_tokens_total - generated) / elapsed_s
        prompt_tps = (stats.num_prompt_tokens_total - prompted) / elapsed_s
        parts = [(f"Engine: {output_tps:,.1f} output tokens/s, {prompt_tps:,.1f} prompt tokens/s; "
                  f"{stats.num_requests_running} running, {stats.num_requests_waiting} waiting; "
                  f"KV cache {100.0 * stats.kv_cache_used_fraction:.1f}% used{self._hit_rate(stats)}")]
        for device, s in readings:
            power = "power ?" if s.power_w is None else f"{s.power_w:.0f} W"
            temperature = "? °C" if s.temperature_c is None else f"{s.temperature_c:.0f} °C"
            parts.append(f"GPU {device.index}: {power}, {temperature}, SM {_mhz(s.sm_clock_mhz)}")
        return " | ".join(parts)

    def _hit_rate(self, stats: EngineStats) -> str:
        """The prefix cache's hit rate over the interval's new requests, as vLLM's line has it."""
        if not stats.enable_prefix_caching:
            return ""
        queried, hit = self._last_prefix_cache
        queries = stats.prefix_cache_queried_tokens_total - queried
        hits = stats.prefix_cache_hit_tokens_total - hit
        return f"; prefix cache hit rate {100.0 * hits / queries if queries else 0.0:.1f}%"

    # -- slowdowns ---------------------------------------------------------------------------

    def _check_gpu(self, now_s: float, busy: bool, device: GpuDevice, sample: GpuSample) -> None:
        watch = self._watches.setdefault(device.index, _GpuWatch())
        slowdowns = sample.active_slowdowns
        idle_clocks = "gpu_idle" in (sample.throttle_reasons or ())  # low clocks between steps are not a fault
        clocks = watch.busy_clocks
        while clocks and now_s - clocks[0][0] > PEAK_WINDOW_S:
            clocks.popleft()
        peak_mhz = max((mhz for _, mhz in clocks), default=None)
        dropped = (busy and not idle_clocks and peak_mhz is not None and sample.sm_clock_mhz is not None
                   and sample.sm_clock_mhz < (1.0 - CLOCK_DROP_FRACTION) * peak_mhz)
        if busy and not idle_clocks and sample.sm_clock_mhz is not None:
            clocks.append((now_s, sample.sm_clock_mhz))
        if not busy:
            return  # an idle card may do as it likes; a slowdown in progress is judged at the next busy tick
        if slowdowns or dropped:
            self._slowdown(now_s, watch, device, sample, frozenset(slowdowns) | ({CLOCK_DROP} if dropped else set()),
                           peak_mhz if dropped else None)
        elif watch.slowing:
            watch.clear_since_s = now_s if watch.clear_since_s is None else watch.clear_since_s
            if now_s - watch.clear_since_s >= RECOVERY_S:
                watch.slowing = False
                logger.info("GPU %d (%s) is back to full speed under load: SM %s, %s.", device.index, device.name,
                            _mhz(sample.sm_clock_mhz), _temperature(sample, device))

    def _slowdown(self, now_s: float, watch: _GpuWatch, device: GpuDevice, sample: GpuSample, causes: frozenset,
                  peak_mhz: float | None) -> None:
        watch.slowing, watch.clear_since_s = True, None
        new_cause = not causes <= watch.warned_causes
        if watch.warned_at_s is not None and not new_cause and now_s - watch.warned_at_s < WARN_REPEAT_S:
            return
        watch.warned_at_s, watch.warned_causes = now_s, causes
        logger.warning("%s", self.slowdown_message(device, sample, peak_mhz))

    @staticmethod
    def slowdown_message(device: GpuDevice, sample: GpuSample, peak_mhz: float | None) -> str:
        """One paragraph: what the card is doing, why (as far as NVML says), and the cost."""
        head = f"GPU {device.index} ({device.name}) is slowing down under load"
        reasons = sample.active_slowdowns
        why = "; ".join(REASON_TEXT.get(r, r) for r in reasons) if reasons else "NVML gives no throttle reason"
        clock = f"SM clock {_mhz(sample.sm_clock_mhz)}"
        if peak_mhz is not None and sample.sm_clock_mhz is not None:
            clock += f", {1.0 - sample.sm_clock_mhz / peak_mhz:.0%} below its peak of {_mhz(peak_mhz)} in the last minute"
        elif device.max_sm_clock_mhz is not None:
            clock += f" (max {_mhz(device.max_sm_clock_mhz)})"
        return (f"{head}: {why}. {clock}; {_temperature(sample, device)}; {_power(sample)}. "
                "Tokens per second drop while this lasts (no request fails).")
