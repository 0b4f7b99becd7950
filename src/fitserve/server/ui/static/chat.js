// The chat playground: streams /v1/chat/completions (Server-Sent Events) and measures each answer.
// TTFT: from sending the request to the first piece of text. Tokens/s: the tokens after the first
// one divided by the time after the first one (the decode speed this client saw).

const $ = (id) => document.getElementById(id);

function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

// The request's sampling fields, leaving out what the server's defaults already mean.
function samplingFields() {
  const fields = { temperature: numberField("temperature"), top_p: numberField("top_p") };
  const topK = numberField("top_k");
  if (topK !== null && topK !== -1) fields.top_k = topK;
  const minP = numberField("min_p");
  if (minP) fields.min_p = minP;
  const maxTokens = numberField("max_tokens");
  if (maxTokens !== null) fields.max_tokens = maxTokens;
  const seed = numberField("seed");
  if (seed !== null) fields.seed = seed;
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== null && !Number.isNaN(v)));
}

// OpenAI's error JSON as one line, e.g. "401 authentication_error: Missing or invalid API key…".
async function errorText(response) {
  try {
    const body = await response.json();
    const error = body.error || {};
    return `${response.status} ${error.type || ""}: ${error.message || response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// Yields the JSON of each `data:` event until `data: [DONE]`.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

export class Chat {
  // getApiKey() -> the key or ""; getModel() -> the served name or null; onAuthError(): ask for the key.
  constructor({ getApiKey, getModel, onAuthError }) {
    this.getApiKey = getApiKey;
    this.getModel = getModel;
    this.onAuthError = onAuthError;
    this.history = []; // [{role, content}] of finished turns, kept in page memory only
    this.controller = null;
    $("chat-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        this.send();
      }
    });
    $("stop").addEventListener("click", () => this.controller && this.controller.abort());
    $("clear").addEventListener("click", () => {
      this.history = [];
      $("messages").replaceChildren();
    });
  }

  bubble(role, text) {
    const item = document.createElement("div");
    item.className = `msg ${role}`;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    item.append(body);
    $("messages").append(item);
    $("messages").scrollTop = $("messages").scrollHeight;
    return item;
  }

  setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
  }

  async send() {
    const content = $("prompt").value.trim();
    if (!content || this.controller) return;
    $("prompt").value = "";
    this.bubble("user", content);
    const answer = this.bubble("assistant", "");
    answer.classList.add("streaming");
    const system = $("system").value.trim();
    const messages = [...(system ? [{ role: "system", content: system }] : []), ...this.history,
      { role: "user", content }];
    const body = { messages, stream: true, stream_options: { include_usage: true }, ...samplingFields() };
    const model = this.getModel();
    if (model) body.model = model;
    this.controller = new AbortController();
    this.setBusy(true);
    try {
      const text = await this.stream(body, answer);
      this.history.push({ role: "user", content }, { role: "assistant", content: text });
    } catch (error) {
      if (error.name === "AbortError") this.note(answer, "stopped", false);
      else this.fail(answer, error.message);
    } finally {
      answer.classList.remove("streaming");
      this.controller = null;
      this.setBusy(false);
    }
  }

  async stream(body, answer) {
    const headers = { "Content-Type": "application/json" };
    const key = this.getApiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    const started = performance.now();
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers, body: JSON.stringify(body), signal: this.controller.signal,
    });
    if (!response.ok) {
      if (response.status === 401) this.onAuthError();
      throw new Error(await errorText(response));
    }
    const textNode = answer.querySelector(".text");
    let text = "";
    let firstAt = null;
    let lastAt = null;
    let numChunks = 0;
    let usage = null;
    let finish = null;
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(`${chunk.error.type || "error"}: ${chunk.error.message}`);
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      if (choice.finish_reason) finish = choice.finish_reason;
      const delta = (choice.delta && choice.delta.content) || "";
      if (!delta) continue;
      const now = performance.now();
      if (firstAt === null) firstAt = now;
      lastAt = now;
      text += delta;
      numChunks += 1;
      textNode.textContent = text;
      answer.dataset.chunks = String(numChunks);
      $("messages").scrollTop = $("messages").scrollHeight;
    }
    const tokens = usage ? usage.completion_tokens : numChunks;
    const ttft = firstAt === null ? null : (firstAt - started) / 1000;
    const decodeS = firstAt === null ? 0 : (lastAt - firstAt) / 1000;
    const tps = tokens > 1 && decodeS > 0 ? (tokens - 1) / decodeS : null;
    answer.dataset.ttft = ttft === null ? "" : ttft.toFixed(4);
    answer.dataset.tps = tps === null ? "" : tps.toFixed(2);
    const parts = [
      `TTFT ${ttft === null ? "–" : `${ttft.toFixed(2)} s`}`,
      `${tps === null ? "–" : tps.toFixed(1)} tokens/s`,
      `${tokens} tokens`,
      `${((performance.now() - started) / 1000).toFixed(2)} s`,
    ];
    if (finish) parts.push(`finish: ${finish}`);
    this.note(answer, parts.join(" · "), false);
    return text;
  }

  note(answer, text, isError) {
    const line = document.createElement("div");
    line.className = isError ? "meta error" : "meta";
    line.textContent = text;
    answer.append(line);
  }

  fail(answer, message) {
    answer.classList.add("failed");
    this.note(answer, message, true);
  }
}
