// Reading /metrics (Prometheus text) into the numbers the dashboard shows.
// Gauges are read as they are; counters become rates and histograms become windowed
// quantiles by comparing with earlier scrapes, as Prometheus' rate() and histogram_quantile() do.

const LABEL_RE = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

// name -> [{labels: {...}, value: number}]
export function parsePrometheus(text) {
  const families = new Map();
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const space = line.lastIndexOf(" ");
    if (space < 0) continue;
    const head = line.slice(0, space);
    const value = Number(line.slice(space + 1));
    const brace = head.indexOf("{");
    const name = brace < 0 ? head : head.slice(0, brace);
    const labels = {};
    if (brace >= 0) {
      for (const m of head.slice(brace + 1, head.lastIndexOf("}")).matchAll(LABEL_RE)) {
        labels[m[1]] = m[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
    }
    if (!families.has(name)) families.set(name, []);
    families.get(name).push({ labels, value });
  }
  return families;
}

// The first sample of a family (fitserve runs one engine), or `fallback`.
export function first(families, name, fallback = null) {
  const samples = families.get(name);
  return samples && samples.length ? samples[0].value : fallback;
}

// Cumulative histogram buckets as [[upper bound, count], ...] sorted, +Inf last.
export function buckets(families, name) {
  const samples = families.get(`${name}_bucket`) || [];
  return samples
    .map((s) => [s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), s.value])
    .sort((a, b) => a[0] - b[0]);
}

// histogram_quantile over cumulative buckets; null when there is no observation.
export function quantile(q, cumulative) {
  if (!cumulative.length) return null;
  const total = cumulative[cumulative.length - 1][1];
  if (total <= 0) return null;
  const rank = q * total;
  let lowerBound = 0;
  let lowerCount = 0;
  for (const [bound, count] of cumulative) {
    if (count >= rank) {
      if (bound === Infinity) return lowerBound; // as Prometheus: the highest finite bound
      const inBucket = count - lowerCount;
      return inBucket > 0 ? lowerBound + (bound - lowerBound) * ((rank - lowerCount) / inBucket) : bound;
    }
    lowerBound = bound;
    lowerCount = count;
  }
  return lowerBound;
}

// Bucket-wise difference of two cumulative histograms with the same bounds (new - old).
export function subtractBuckets(newer, older) {
  if (!older || older.length !== newer.length) return newer;
  return newer.map(([bound, count], i) => [bound, count - older[i][1]]);
}

// Keeps recent scrapes so counters can be read as rates over a window.
export class ScrapeHistory {
  constructor(maxAgeMs) {
    this.maxAgeMs = maxAgeMs;
    this.entries = []; // [{t: ms, families}]
  }

  push(t, families) {
    this.entries.push({ t, families });
    while (this.entries.length > 2 && t - this.entries[1].t >= this.maxAgeMs) this.entries.shift();
  }

  // The oldest kept scrape at least `windowMs` old, else the oldest one.
  since(t, windowMs) {
    let chosen = this.entries[0];
    for (const entry of this.entries) {
      if (t - entry.t >= windowMs) chosen = entry;
      else break;
    }
    return chosen;
  }

  // Increase of a counter over about `windowMs` (less while the page is younger) and the seconds it
  // spans; null until two scrapes exist.
  increase(name, windowMs) {
    const last = this.entries[this.entries.length - 1];
    if (!last) return null;
    const old = this.since(last.t, windowMs);
    if (!old || old === last) return null;
    const now = first(last.families, name);
    const before = first(old.families, name);
    if (now === null || before === null) return null;
    return { delta: Math.max(now - before, 0), seconds: (last.t - old.t) / 1000 }; // a restart: negative
  }

  // Per-second increase of a counter over about `windowMs`.
  rate(name, windowMs) {
    const change = this.increase(name, windowMs);
    return change === null ? null : change.delta / change.seconds;
  }

  // Quantile of the observations made during about the last `windowMs`.
  windowQuantile(q, name, windowMs) {
    const last = this.entries[this.entries.length - 1];
    if (!last) return null;
    const old = this.since(last.t, windowMs);
    const now = buckets(last.families, name);
    if (!old || old === last) return null;
    return quantile(q, subtractBuckets(now, buckets(old.families, name)));
  }
}
