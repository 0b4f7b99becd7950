// Hand-drawn canvas gauges and time-series charts (no library: the page loads nothing else).

const FONT = "11px system-ui, -apple-system, 'Segoe UI', sans-serif";
const MIN_SPAN_MS = 30000; // the narrowest time axis
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

// Size the canvas's backing store to its CSS box and the screen's pixel ratio; returns a 2D context
// in CSS pixels, or null while the canvas is not laid out.
function prepare(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return null;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  return { ctx, width, height };
}

// The colour for a fill fraction: calm, then warning, then alarm.
export function levelColor(fraction) {
  if (fraction >= 0.9) return css("--bad");
  if (fraction >= 0.7) return css("--warn");
  return css("--good");
}

// A half-circle gauge filled to `fraction` (0..1), with its label in the middle.
export function drawGauge(canvas, fraction, label) {
  const area = prepare(canvas);
  if (!area) return;
  const { ctx, width, height } = area;
  const radius = Math.min(width / 2, height) - 10;
  const cx = width / 2;
  const cy = height - 6;
  const clamped = Math.min(Math.max(fraction || 0, 0), 1);
  ctx.lineWidth = 14;
  ctx.lineCap = "butt";
  ctx.strokeStyle = css("--track");
  ctx.beginPath();
  ctx.arc(cx, cy, radius, Math.PI, 2 * Math.PI);
  ctx.stroke();
  ctx.strokeStyle = levelColor(clamped);
  ctx.beginPath();
  ctx.arc(cx, cy, radius, Math.PI, Math.PI + clamped * Math.PI);
  ctx.stroke();
  ctx.fillStyle = css("--fg");
  ctx.font = "600 17px system-ui, sans-serif";
  ctx.textAlign = "center";
  ctx.textBaseline = "alphabetic";
  ctx.fillText(label, cx, cy - 4);
}

// A round upper end for a y axis: 1, 2 or 5 times a power of ten.
function niceCeil(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

// Keeps the last `spanMs` of samples of one or more series and draws them.
export class TimeSeries {
  constructor(canvas, series, { spanMs = 120000, yMax = null, format = (v) => String(v) } = {}) {
    this.canvas = canvas;
    this.series = series; // [{label, color: css variable name}]
    this.spanMs = spanMs;
    this.yMax = yMax; // fixed top of the axis (e.g. 1 for a fraction), else from the data
    this.format = format;
    this.points = []; // [{t, values: [number | null, ...]}]
  }

  push(t, values) {
    this.points.push({ t, values });
    while (this.points.length && t - this.points[0].t > this.spanMs) this.points.shift();
  }

  draw() {
    const area = prepare(this.canvas);
    if (!area) return;
    const { ctx, width, height } = area;
    const now = this.points.length ? this.points[this.points.length - 1].t : 0;
    // The x axis grows with the data from MIN_SPAN_MS to spanMs, so a fresh page is not one thin line.
    const dataSpan = this.points.length ? now - this.points[0].t : 0;
    const span = Math.min(this.spanMs, Math.max(MIN_SPAN_MS, Math.ceil(dataSpan / MIN_SPAN_MS) * MIN_SPAN_MS));
    const dataMax = Math.max(0, ...this.points.flatMap((p) => p.values.filter((v) => v !== null && v !== undefined)));
    const top = this.yMax ?? niceCeil(dataMax * 1.1);
    ctx.font = FONT;
    const labelWidth = Math.max(...[0, 0.5, 1].map((f) => ctx.measureText(this.format(top * f)).width));
    const pad = { left: Math.ceil(labelWidth) + 8, right: 6, top: 14, bottom: 12 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const x = (t) => pad.left + plotW * (1 - (now - t) / span);
    const y = (v) => pad.top + plotH * (1 - Math.min(v / top, 1));

    ctx.strokeStyle = css("--grid");
    ctx.fillStyle = css("--muted");
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const fraction of [0, 0.5, 1]) {
      const yy = Math.round(y(top * fraction)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.left, yy);
      ctx.lineTo(width - pad.right, yy);
      ctx.stroke();
      ctx.fillText(this.format(top * fraction), pad.left - 4, yy);
    }
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillText(span >= 60000 ? `last ${span / 60000} min` : `last ${span / 1000} s`, pad.left, height - pad.bottom + 1);

    this.series.forEach((serie, index) => {
      const color = css(serie.color);
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.6;
      ctx.beginPath();
      let drawing = false;
      for (const point of this.points) {
        if (now - point.t > span) continue;
        const value = point.values[index];
        if (value === null || value === undefined || Number.isNaN(value)) {
          drawing = false;
          continue;
        }
        if (drawing) ctx.lineTo(x(point.t), y(value));
        else ctx.moveTo(x(point.t), y(value));
        drawing = true;
      }
      ctx.stroke();
      if (this.series.length > 1) {
        ctx.fillStyle = color;
        ctx.textAlign = "right";
        ctx.fillText(serie.label, width - pad.right - index * 64, 0);
      }
    });
  }
}
