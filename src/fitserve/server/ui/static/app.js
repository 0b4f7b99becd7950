// The page: polls /health and /metrics every second, reads /ui/api/info once the engine is
// ready, draws the gauges and charts, and runs the chat. Keys live in this module's memory
// only (never in storage, cookies or the URL): a reload forgets them.

import { Chat } from "./chat.js";
import { TimeSeries, drawGauge, levelColor } from "./charts.js";
import { ScrapeHistory, buckets, first, parsePrometheus, quantile } from "./metrics.js";

const REFRESH_MS = 1000;
const RATE_WINDOW_MS = 3000; // output tokens/s: the increase over about 3 s
const TTFT_WINDOW_MS = 30000; // TTFT p50 of the first tokens of about the last 30 s
const PREEMPT_WINDOW_MS = 60000;
const $ = (id) => document.getElementById(id);
const auth = JSON.parse(document.body.dataset.auth || "{}");
const keys = { api: "", metrics: "" };
const history = new ScrapeHistory(PREEMPT_WINDOW_MS + 5000);
let info = null; // GET /ui/api/info, once ready
let lastPreemptions = null;

const int = (v) => (v === null || v === undefined ? "–" : Math.round(v).toLocaleString("en-US"));
const gib = (bytes) => (bytes === null || bytes === undefined ? "–" : `${(bytes / 2 ** 30).toFixed(2)} GiB`);
function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${(s * 1000).toFixed(0)} ms`;
  return `${s.toFixed(s < 10 ? 2 : 1)} s`;
}
// Axis labels: as short as they can be.
const axisSeconds = (s) => (s === 0 ? "0" : s < 1 ? `${+(s * 1000).toPrecision(3)} ms` : `${+s.toPrecision(3)} s`);
const percent = (f) => `${(100 * f).toFixed(0)}%`;

const charts = {
  kv: new TimeSeries($("chart-kv"), [{ label: "usage", color: "--accent" }], { yMax: 1, format: percent }),
  free: new TimeSeries($("chart-free"), [{ label: "free", color: "--accent" }], { format: compact }),
  reqs: new TimeSeries($("chart-reqs"), [{ label: "running", color: "--accent" }, { label: "waiting", color: "--warn" }],
    { format: compact }),
  tps: new TimeSeries($("chart-tps"), [{ label: "tokens/s", color: "--accent" }], { format: compact }),
  ttft: new TimeSeries($("chart-ttft"), [{ label: "p50", color: "--accent" }], { format: axisSeconds }),
  preempt: new TimeSeries($("chart-preempt"), [{ label: "per step", color: "--bad" }], { format: compact }),
  power: new TimeSeries($("chart-power"), [{ label: "W", color: "--warn" }], { format: (w) => `${compact(w)} W` }),
};

function compact(v) {
  if (v >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
  if (v >= 1e4) return `${(v / 1e3).toFixed(0)}k`;
  if (v >= 1e3) return `${(v / 1e3).toFixed(1)}k`;
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}

function setValue(id, value, text) {
  $(id).dataset.value = value === null || value === undefined ? "" : String(value);
  $(id).textContent = text;
}

function authHeaders(key) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function banner(text) {
  $("banner").hidden = !text;
  $("banner").textContent = text || "";
}

function askForKey(box, input) {
  $(box).hidden = false;
  if (document.activeElement !== $(input)) $(input).focus();
}

async function fetchPhase() {
  try {
    const response = await fetch("/health", { cache: "no-store" });
    const body = await response.json();
    return { phase: body.phase || (response.ok ? "ready" : "unknown"), message: body.error && body.error.message };
  } catch {
    return { phase: "unreachable", message: "Cannot reach the server." };
  }
}

async function fetchMetrics() {
  try {
    const response = await fetch("/metrics", { cache: "no-store", headers: authHeaders(keys.metrics || keys.api) });
    if (response.status === 401) return { unauthorized: true };
    if (!response.ok) return { error: `/metrics answered ${response.status}` };
    return { families: parsePrometheus(await response.text()) };
  } catch {
    return { error: "Cannot reach /metrics." };
  }
}

async function loadInfo() {
  const response = await fetch("/ui/api/info", { cache: "no-store", headers: authHeaders(keys.metrics || keys.api) });
  if (response.status === 401) return { unauthorized: true };
  if (!response.ok) return null;
  return response.json();
}

function row(table, cells, header = false) {
  const tr = document.createElement("tr");
  cells.forEach((cell, index) => {
    const td = document.createElement(header || index === 0 ? "th" : "td");
    td.textContent = cell;
    tr.append(td);
  });
  table.append(tr);
}

function renderSettings() {
  const table = $("settings");
  table.replaceChildren();
  const s = info.settings || {};
  const e = info.engine || {};
  const memory = info.memory;
  const device = memory && memory.on_gpu ? `GPU: ${memory.gpu_name || "cuda"} (${gib(memory.device_total_bytes)})`
    : s.device || "–";
  const rows = [
    ["served model name", info.model],
    ["--model", s.model],
    ["device", device],
    ["--dtype", s.dtype],
    ["--quantization", s.quantization || "none"],
    ["--kv-cache-dtype", s.kv_cache_dtype],
    ["--max-model-len", int(e.max_model_len)],
    ["--max-num-seqs", int(e.max_num_seqs)],
    ["--max-num-batched-tokens", int(s.max_num_batched_tokens)],
    ["KV cache", `${int(e.kv_capacity_tokens)} tokens = ${int(e.num_kv_blocks)} blocks of ${int(e.block_size)}`],
    ["prefix caching", s.enable_prefix_caching === undefined ? undefined : (s.enable_prefix_caching ? "on" : "off")],
  ];
  if (memory && memory.on_gpu) rows.push(["--gpu-memory-utilization", String(s.gpu_memory_utilization)]);
  if (s.enforce_eager) rows.push(["--enforce-eager", "on"]);
  rows.push(["fitserve", info.version]);
  for (const [name, value] of rows) if (value !== undefined && value !== null) row(table, [name, String(value)]);
}

function renderMemory() {
  const table = $("memory");
  table.replaceChildren();
  for (const old of document.querySelectorAll("#memory-panel .warning")) old.remove();
  const memory = info.memory;
  if (!memory) {
    $("memory-note").textContent = "No start-up plan was recorded (this engine was not started by fitserve serve).";
    return;
  }
  row(table, [memory.on_gpu ? "GPU memory" : "memory", "planned", "actual"], true);
  for (const r of memory.rows) row(table, [r.name, gib(r.planned_bytes), gib(r.actual_bytes)]);
  row(table, ["KV blocks", int(memory.kv_blocks.planned), int(memory.kv_blocks.actual)]);
  row(table, ["KV tokens", int(memory.kv_tokens.planned), int(memory.kv_tokens.actual)]);
  const notes = [`KV cache in ${memory.kv_dtype}: ${(memory.kv_bytes_per_token / 1024).toFixed(1)} KiB per token.`];
  if (memory.on_gpu) {
    notes.push(`Budget ${gib(memory.budget_bytes)} of ${gib(memory.device_total_bytes)}.`);
    if (memory.used_after_startup_bytes !== null) {
      notes.push(`In use after start-up: ${gib(memory.used_after_startup_bytes)}; ` +
        `${gib(memory.free_after_startup_bytes)} of the card free.`);
    }
  } else {
    notes.push("On the CPU, start-up measures nothing (–): the KV cache is --kv-cache-memory-bytes and the " +
      "weights live in RAM beside it.");
    if (info.process_resident_bytes) {
      notes.push(`Process resident memory when this page loaded: ${gib(info.process_resident_bytes)}.`);
    }
  }
  $("memory-note").textContent = notes.join(" ");
  for (const warning of memory.warnings || []) {
    const line = document.createElement("p");
    line.className = "note warning";
    line.textContent = `Plan warning: ${warning}`;
    $("memory-note").after(line);
  }
}

function renderAdmissible(families) {
  const table = $("admissible");
  table.replaceChildren();
  const maxModelLen = info && info.engine ? info.engine.max_model_len : Infinity; // longer can never run
  const samples = (families.get("fitserve:num_requests_admissible") || [])
    .map((s) => [Number(s.labels.context_tokens), s.value])
    .filter(([context]) => context <= maxModelLen)
    .sort((a, b) => a[0] - b[0]);
  if (!samples.length) return;
  row(table, ["context tokens", ...samples.map(([c]) => int(c))], true);
  row(table, ["requests", ...samples.map(([, v]) => int(v))]);
}

// fitserve:gpu_* (docs/telemetry.md), one column per GPU (label `gpu`); absent without a GPU.
function renderGpu(families) {
  const byGpu = (name) => new Map((families.get(name) || []).map((s) => [s.labels.gpu, s]));
  const info = byGpu("fitserve:gpu_info");
  $("card-gpu").hidden = info.size === 0;
  const table = $("gpu-table");
  table.replaceChildren();
  if (!info.size) return null;
  const gpus = [...info.keys()].sort();
  const read = (name, gpu) => (byGpu(name).get(gpu) || { value: null }).value;
  const pair = (a, b, format) => (a === null ? "–" : b === null ? format(a) : `${format(a)} / ${format(b)}`);
  const reasons = (gpu) => (families.get("fitserve:gpu_throttle_active") || [])
    .filter((s) => s.labels.gpu === gpu && s.value > 0).map((s) => s.labels.reason).join(", ") || "none";
  if (gpus.length > 1) row(table, ["GPU", ...gpus], true);
  const rows = [
    ["name", (g) => info.get(g).labels.name],
    ["power (W)", (g) => pair(read("fitserve:gpu_power_watts", g), read("fitserve:gpu_power_limit_watts", g),
      (v) => v.toFixed(0))],
    ["temperature (°C)", (g) => pair(read("fitserve:gpu_temperature_celsius", g),
      read("fitserve:gpu_slowdown_temperature_celsius", g), (v) => v.toFixed(0))],
    ["SM clock (MHz)", (g) => pair(read("fitserve:gpu_sm_clock_mhz", g), read("fitserve:gpu_sm_clock_max_mhz", g),
      (v) => v.toFixed(0))],
    ["utilization", (g) => pair(read("fitserve:gpu_utilization_percent", g), null, (v) => `${v.toFixed(0)}%`)],
    ["memory (GiB)", (g) => pair(read("fitserve:gpu_memory_used_bytes", g), read("fitserve:gpu_memory_total_bytes", g),
      (v) => (v / 2 ** 30).toFixed(1))],
    ["energy", (g) => pair(read("fitserve:gpu_energy_joules_total", g), null, (v) => `${(v / 1000).toFixed(1)} kJ`)],
    ["throttling", reasons],
  ];
  for (const [label, cell] of rows) row(table, [label, ...gpus.map(cell)]);
  const power = gpus.map((g) => read("fitserve:gpu_power_watts", g)).filter((v) => v !== null);
  return power.length ? power.reduce((a, b) => a + b, 0) : null;
}

function renderMetrics(now, families) {
  history.push(now, families);
  const kv = first(families, "vllm:kv_cache_usage_perc");
  const free = first(families, "fitserve:kv_cache_free_tokens");
  const capacity = first(families, "fitserve:kv_cache_capacity_tokens");
  const running = first(families, "vllm:num_requests_running");
  const waiting = first(families, "vllm:num_requests_waiting");
  const preemptions = first(families, "vllm:num_preemptions_total");
  const tps = history.rate("vllm:generation_tokens_total", RATE_WINDOW_MS);
  const ttft = history.windowQuantile(0.5, "vllm:time_to_first_token_seconds", TTFT_WINDOW_MS);
  const ttftAll = quantile(0.5, buckets(families, "vllm:time_to_first_token_seconds"));
  const blockSize = info && info.engine ? info.engine.block_size : null;
  const maxSeqs = info && info.engine ? info.engine.max_num_seqs : null;

  drawGauge($("gauge-kv"), kv, kv === null ? "–" : percent(kv));
  setValue("v-kv", kv, kv === null ? "–" : `${(100 * kv).toFixed(1)}%`);
  $("s-kv").textContent = capacity && blockSize ? `${int((capacity - free) / blockSize)} of ${int(capacity / blockSize)} blocks in use` : "";
  setValue("v-free", free, int(free));
  $("s-free").textContent = capacity ? `of ${int(capacity)} tokens` : "";
  $("bar-free").style.width = capacity ? percent(free / capacity) : "0%";
  $("bar-free").style.background = levelColor(capacity ? 1 - free / capacity : 0);
  setValue("v-running", running, int(running));
  setValue("v-waiting", waiting, int(waiting));
  $("bar-running").style.width = maxSeqs ? percent(Math.min(running / maxSeqs, 1)) : "0%";
  const finished = (families.get("vllm:request_success_total") || []).reduce((sum, s) => sum + s.value, 0);
  $("s-reqs").textContent = `${maxSeqs ? `--max-num-seqs ${int(maxSeqs)} · ` : ""}${int(finished)} finished`;
  setValue("v-tps", tps, tps === null ? "–" : tps.toFixed(1));
  $("s-tps").textContent = `${int(first(families, "vllm:generation_tokens_total"))} generated in all`;
  setValue("v-ttft", ttft, ttft === null ? "–" : seconds(ttft));
  $("s-ttft").textContent = `first tokens of the last ${TTFT_WINDOW_MS / 1000} s · all-time p50 ${seconds(ttftAll)}`;
  setValue("v-preempt", preemptions, int(preemptions));
  const recent = history.increase("vllm:num_preemptions_total", PREEMPT_WINDOW_MS);
  $("s-preempt").textContent = `in all · ${recent === null ? "–" : int(recent.delta)} in the last minute`;
  const stepPreemptions = lastPreemptions === null || preemptions === null ? 0 : Math.max(preemptions - lastPreemptions, 0);
  lastPreemptions = preemptions;

  charts.kv.push(now, [kv]);
  charts.free.push(now, [free]);
  charts.free.yMax = capacity || null;
  charts.reqs.push(now, [running, waiting]);
  charts.tps.push(now, [tps]);
  charts.ttft.push(now, [ttft]);
  charts.preempt.push(now, [stepPreemptions]);
  renderAdmissible(families);
  const powerW = renderGpu(families);
  if (powerW !== null) charts.power.push(now, [powerW]);
}

function drawAll() {
  for (const chart of Object.values(charts)) chart.draw();
}

async function tick() {
  const now = performance.now();
  const { phase, message } = await fetchPhase();
  $("phase").textContent = phase;
  $("phase").dataset.phase = phase;
  const notices = phase === "ready" ? [] : [message || `The server is ${phase}.`];
  if (phase === "ready" && (!info || info.phase !== "ready")) {
    const loaded = await loadInfo().catch(() => null);
    if (loaded && loaded.unauthorized) askForKey("metrics-key-box", "metrics-key");
    else if (loaded) {
      info = loaded;
      $("model-name").textContent = info.model || "";
      $("version").textContent = info.version ? `v${info.version}` : "";
      renderSettings();
      renderMemory();
    }
  }
  const metrics = await fetchMetrics();
  if (metrics.unauthorized) {
    askForKey("metrics-key-box", "metrics-key");
    notices.push("/metrics needs the metrics key (--metrics-api-key): enter it above to see the live figures.");
  } else if (metrics.error) {
    if (phase !== "unreachable") notices.push(metrics.error);
  } else if (metrics.families.has("vllm:kv_cache_usage_perc")) {
    renderMetrics(now, metrics.families);
  }
  drawAll();
  banner(notices.join(" "));
  setTimeout(tick, Math.max(REFRESH_MS - (performance.now() - now), 50));
}

function setUpKeys() {
  if (auth.api_key) $("api-key-box").hidden = false;
  if (auth.metrics_key) $("metrics-key-box").hidden = false;
  $("api-key").addEventListener("input", (event) => { keys.api = event.target.value.trim(); });
  $("metrics-key").addEventListener("input", (event) => {
    keys.metrics = event.target.value.trim();
    info = null; // read again with the new key
  });
}

setUpKeys();
new Chat({
  getApiKey: () => keys.api,
  getModel: () => (info ? info.model : null),
  onAuthError: () => askForKey("api-key-box", "api-key"),
});
window.addEventListener("resize", drawAll);
tick();
