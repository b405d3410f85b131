// The monitoring dashboard: polls GET /v1/monitor every 2 s and draws it.
//
// Read-only. Time-series charts are uPlot (vendored); the reliability plot is drawn on a plain
// canvas. After every render the page records what it drew in data attributes
// (document.body.dataset.renders, each chart's data-points), which the browser test reads.
"use strict";

const POLL_MS = 2000;
const COLORS = ["#1b6ca8", "#d1495b", "#2e933c", "#8f5db7", "#e08e0b", "#00798c", "#6b6b66"];
const charts = {};
let renders = 0;

const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 3) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits));
const pct = (v, digits = 1) => (v === null || v === undefined ? "–" : (100 * v).toFixed(digits) + "%");
const count = (v) => (v === null || v === undefined ? "–" : Math.round(v).toLocaleString("en-US"));
const rate = (v) => (v >= 1000 ? (v / 1000).toFixed(1) + "k" : v.toFixed(v >= 100 ? 0 : 1));
const ago = (ms) => (ms === null || ms === undefined ? "–" : ms < 1000 ? ms + " ms" : (ms / 1000).toFixed(1) + " s");

function text(el, value) {
  el.textContent = value;
}

function row(cells, classes = []) {
  const tr = document.createElement("tr");
  cells.forEach((c, i) => {
    const td = document.createElement("td");
    td.textContent = c;
    if (classes[i]) td.className = classes[i];
    tr.appendChild(td);
  });
  return tr;
}

function fill(tableId, rows) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(...rows);
}

// One uPlot time-series chart, created on first use and fed new data afterwards. `series` is
// [{label, color, dash}] and `columns` the y columns in the same order.
function timeChart(id, xs, series, columns, yRange) {
  const el = $(id);
  const key = id + ":" + series.map((s) => s.label).join(",");
  const width = el.clientWidth || 560;
  if (!charts[id] || charts[id].key !== key) {
    if (charts[id]) charts[id].plot.destroy();
    const opts = {
      width,
      height: 220,
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: yRange ? { range: yRange } : {} },
      series: [{}].concat(
        series.map((s) => ({
          label: s.label,
          stroke: s.color,
          width: 1.5,
          dash: s.dash ? [6, 4] : undefined,
          spanGaps: true,
          points: { show: false },
        })),
      ),
      axes: [{}, { size: 60 }],
    };
    charts[id] = { key, plot: new uPlot(opts, [xs, ...columns], el) };
  } else {
    charts[id].plot.setData([xs, ...columns]);
  }
  el.dataset.points = String(xs.length);
  el.dataset.series = String(series.length);
}

function modelSeries(history, metric) {
  const names = Object.keys(history.models).sort();
  const series = [];
  const columns = [];
  names.forEach((name, i) => {
    const m = history.models[name];
    series.push({ label: name, color: COLORS[i % COLORS.length] });
    columns.push(m[metric]);
    series.push({ label: name + " (window)", color: COLORS[i % COLORS.length], dash: true });
    columns.push(m["window_" + metric]);
  });
  return { series, columns };
}

// Observed against predicted CTR per reliability bin, log-log, with the diagonal.
function drawReliability(models) {
  const canvas = $("c-reliability");
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 560;
  const h = canvas.clientHeight || 260;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, w, h);
  const pad = { l: 52, r: 120, t: 10, b: 32 };
  const lo = -4;
  const hi = 0;
  const x = (p) => pad.l + ((Math.log10(p) - lo) / (hi - lo)) * (w - pad.l - pad.r);
  const y = (p) => h - pad.b - ((Math.log10(p) - lo) / (hi - lo)) * (h - pad.t - pad.b);
  ctx.strokeStyle = "#deddd8";
  ctx.fillStyle = "#6b6b66";
  ctx.font = "11px system-ui, sans-serif";
  for (let e = lo; e <= hi; e++) {
    const p = Math.pow(10, e);
    ctx.beginPath();
    ctx.moveTo(x(p), pad.t);
    ctx.lineTo(x(p), h - pad.b);
    ctx.moveTo(pad.l, y(p));
    ctx.lineTo(w - pad.r, y(p));
    ctx.stroke();
    ctx.fillText(String(p), x(p) - 10, h - pad.b + 14);
    ctx.fillText(String(p), 4, y(p) + 4);
  }
  ctx.fillText("predicted", (w - pad.r) / 2, h - 4);
  ctx.strokeStyle = "#999";
  ctx.setLineDash([4, 4]);
  ctx.beginPath();
  ctx.moveTo(x(1e-4), y(1e-4));
  ctx.lineTo(x(1), y(1));
  ctx.stroke();
  ctx.setLineDash([]);
  let drawn = 0;
  models.forEach((m, i) => {
    const color = COLORS[i % COLORS.length];
    const bins = m.reliability.filter((b) => b.observed > 0 && b.mean_predicted > 0 && b.weight >= 50);
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.beginPath();
    bins.forEach((b, k) => {
      const px = x(b.mean_predicted);
      const py = y(Math.max(b.observed, 1e-4));
      if (k === 0) ctx.moveTo(px, py);
      else ctx.lineTo(px, py);
    });
    ctx.stroke();
    bins.forEach((b) => {
      ctx.beginPath();
      ctx.arc(x(b.mean_predicted), y(Math.max(b.observed, 1e-4)), 3, 0, 2 * Math.PI);
      ctx.fill();
      drawn++;
    });
    ctx.fillText(m.name + (m.serving ? " (serving)" : ""), w - pad.r + 8, pad.t + 14 + 16 * i);
  });
  canvas.dataset.points = String(drawn);
}

function render(data) {
  const view = data.latest;
  const h = data.history;
  if (!view) return;
  const age = Date.now() - view.ts_ms;
  const status = $("status");
  status.className = "status" + (age > 10000 ? " stale" : "");
  text(
    status,
    `${view.scorers.length} scorer(s), ${view.joiner.instances} joiner(s), serving model ${view.serve_model || "–"}, ` +
      `view of ${new Date(view.ts_ms).toLocaleTimeString()}` + (age > 10000 ? " (stale)" : ""),
  );

  text($("t-events"), rate(view.rates.events_in));
  text($("t-labeled"), rate(view.rates.labeled));
  text($("t-shed"), pct(view.rates.shed_share));
  text($("t-shed-unit"), view.keep_rate < 1 || view.thinning > 1 ? `keep ${pct(view.keep_rate, 0)}, thinning ×${view.thinning}` : "nothing shed");
  text($("t-coverage"), pct(view.joiner.click_coverage));
  const learning = $("t-learning");
  text(learning, view.learning && !view.joiner.stalled ? "on" : "paused");
  learning.parentElement.className = "tile " + (view.learning && !view.joiner.stalled ? "good" : "bad");
  text($("t-guard"), view.guard_reason || view.joiner.reason || "click stream healthy");
  text($("t-publish"), ago(view.publish_age_ms));
  // Labels arrive once their serve's attribution window has closed, so this runs ~35 s.
  text($("t-event-age"), "newest learned event " + ago(view.event_age_ms) + " old");
  const maxLag = view.partitions.reduce((m, p) => Math.max(m, p.lag), 0);
  text($("t-lag"), count(maxLag));

  const xs = h.ts_ms.map((t) => t / 1000);
  timeChart(
    "c-throughput",
    xs,
    [
      { label: "events in", color: COLORS[0] },
      { label: "labeled", color: COLORS[1] },
      { label: "learned", color: COLORS[2] },
      { label: "shed", color: COLORS[4] },
    ],
    [h.events_in, h.labeled, h.learned, h.shed],
  );
  const partitions = Object.keys(h.lag).sort((a, b) => a - b);
  timeChart(
    "c-lag",
    xs,
    partitions.map((p, i) => ({ label: "partition " + p, color: COLORS[i % COLORS.length] })),
    partitions.map((p) => h.lag[p]),
  );
  for (const [id, metric] of [
    ["c-ne", "ne"],
    ["c-logloss", "log_loss"],
    ["c-auc", "auc"],
    ["c-calibration", "calibration"],
  ]) {
    const { series, columns } = modelSeries(h, metric);
    timeChart(id, xs, series, columns);
  }
  drawReliability(view.models);

  fill(
    "models",
    view.models.map((m) =>
      row(
        [
          m.name + (m.serving ? " (serving)" : ""),
          count(m.cumulative.examples),
          fmt(m.cumulative.ne, 4),
          fmt(m.cumulative.log_loss, 5),
          m.cumulative.auc === null ? "–" : `${fmt(m.cumulative.auc, 4)} ±${fmt(m.cumulative.auc_error, 4)}`,
          fmt(m.cumulative.calibration, 3),
          fmt(m.cumulative.reliability_error, 3),
          pct(m.cumulative.mean_pctr, 2),
          pct(m.cumulative.observed_ctr, 2),
          fmt(m.window.ne, 4),
          fmt(m.window.calibration, 3),
        ],
        [, , , , , Math.abs((m.cumulative.calibration ?? 1) - 1) > 0.1 ? "off" : ""],
      ),
    ),
  );
  text($("ads-model"), view.serve_model ? `(serving model ${view.serve_model})` : "");
  fill(
    "ads",
    view.ads.map((a) => {
      const ratio = a.mean_pctr && a.observed_ctr ? a.mean_pctr / a.observed_ctr : null;
      return row(
        [
          a.ad_id,
          count(a.impressions),
          count(a.clicks),
          pct(a.observed_ctr, 2),
          pct(a.mean_pctr, 2),
          fmt(ratio, 2),
          pct(a.published_pctr, 2),
          a.model_version || "–",
        ],
        [, , , , , ratio !== null && Math.abs(ratio - 1) > 0.25 ? "off" : ""],
      );
    }),
  );
  fill("partitions", view.partitions.map((p) => row([String(p.partition), count(p.lag), p.instance])));
  fill("records", Object.entries(view.records).map(([k, v]) => row([k, count(v)])));
  const j = view.joiner;
  fill("joiner", [
    row(["serves", count(j.serves)]),
    row(["clicks", count(j.clicks)]),
    row(["labels emitted", count(j.labels)]),
    row(["late clicks", count(j.late_clicks)]),
    row(["orphan clicks", count(j.orphan_clicks)]),
    row(["duplicate clicks", count(j.duplicate_clicks)]),
  ]);

  renders++;
  window.__lastView = view;
  document.body.dataset.renders = String(renders);
  document.body.dataset.viewTs = String(view.ts_ms);
}

async function poll() {
  try {
    const res = await fetch("/v1/monitor", { cache: "no-store" });
    if (!res.ok) throw new Error("HTTP " + res.status);
    render(await res.json());
  } catch (e) {
    const status = $("status");
    status.className = "status stale";
    text(status, "cannot reach the scorer: " + e.message);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
