// Loads the scorer's monitoring dashboard in Debian's Chromium and checks that it draws live
// data; saves a screenshot. Run by the e2e test `dashboard::...` (which starts the pipeline):
//
//   node e2e/browser/dashboard.mjs http://127.0.0.1:PORT out.png MIN_POINTS
//
// Exit 0 with a JSON summary on stdout when every check holds; 1 with the failed check
// otherwise.
import { chromium } from "playwright-core";

const [base, screenshot, minPointsArg] = process.argv.slice(2);
const minPoints = Number(minPointsArg || 3);
if (!base || !screenshot) {
  console.error("usage: dashboard.mjs BASE_URL SCREENSHOT.png [MIN_POINTS]");
  process.exit(2);
}

function check(ok, what) {
  if (!ok) throw new Error("check failed: " + what);
}

const browser = await chromium.launch({
  executablePath: process.env.CTR_CHROMIUM || "/usr/bin/chromium",
  // As root, without a sandbox; no background traffic (this machine's network is closed).
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
let failed = null;
const summary = {};
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  const external = [];
  page.on("request", (r) => {
    if (!r.url().startsWith(base)) external.push(r.url());
  });

  await page.goto(base + "/dashboard/", { waitUntil: "load" });
  // Two renders: the charts have been created and then updated from a later poll.
  await page.waitForFunction(() => Number(document.body.dataset.renders || 0) >= 2, null, {
    timeout: 30_000,
  });
  const server = await (await fetch(base + "/v1/monitor")).json();
  const drawn = await page.evaluate(() => {
    const view = window.__lastView;
    const chart = (id) => {
      const el = document.getElementById(id);
      return {
        points: Number(el.dataset.points || 0),
        series: Number(el.dataset.series || 0),
        canvases: el.querySelectorAll("canvas").length,
      };
    };
    // Pixels of the first series' colour (#1b6ca8) in a chart's canvas: a line drawn from
    // data, not just axes and grid.
    const inkOf = (el, rgb) => {
      const c = el.tagName === "CANVAS" ? el : el.querySelector("canvas");
      if (!c) return 0;
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      for (let i = 0; i < d.length; i += 4) {
        if (d[i + 3] > 0 && Math.abs(d[i] - rgb[0]) < 40 && Math.abs(d[i + 1] - rgb[1]) < 40 && Math.abs(d[i + 2] - rgb[2]) < 40) n++;
      }
      return n;
    };
    const blue = [27, 108, 168];
    const ids = ["c-throughput", "c-lag", "c-ne", "c-logloss", "c-auc", "c-calibration"];
    const rows = (id) => [...document.querySelectorAll(`#${id} tbody tr`)].map((tr) => [...tr.children].map((td) => td.textContent));
    return {
      view,
      charts: Object.fromEntries(ids.map((id) => [id, chart(id)])),
      ink: Object.fromEntries(ids.map((id) => [id, inkOf(document.getElementById(id), blue)])),
      reliabilityPoints: Number(document.getElementById("c-reliability").dataset.points || 0),
      reliabilityInk: inkOf(document.getElementById("c-reliability"), blue),
      models: rows("models"),
      ads: rows("ads"),
      partitions: rows("partitions"),
      labeled: document.getElementById("t-labeled").textContent,
      learning: document.getElementById("t-learning").textContent,
    };
  });

  const view = drawn.view;
  const modelNames = server.latest.models.map((m) => m.name).sort();
  check(errors.length === 0, "no script errors: " + errors.join("; "));
  check(external.length === 0, "no request leaves the scorer (offline): " + external.join(", "));
  check(view && view.models.length > 0, "the page holds a view with models");
  check(JSON.stringify(view.models.map((m) => m.name).sort()) === JSON.stringify(modelNames), "same models as /v1/monitor");
  for (const [id, c] of Object.entries(drawn.charts)) {
    check(c.canvases > 0, `${id} has a canvas`);
    check(c.points >= minPoints, `${id} plots at least ${minPoints} points (has ${c.points})`);
  }
  for (const id of ["c-ne", "c-logloss", "c-auc", "c-calibration"]) {
    check(drawn.charts[id].series === 2 * modelNames.length, `${id}: cumulative and window series per model`);
  }
  for (const id of ["c-throughput", "c-ne", "c-auc", "c-calibration"]) {
    check(drawn.ink[id] > 30, `${id}: its first series is drawn (${drawn.ink[id]} pixels)`);
  }
  check(drawn.reliabilityPoints > 0 && drawn.reliabilityInk > 10, "the reliability plot has points");
  check(drawn.models.length === view.models.length, "a table row per model");
  check(drawn.models.every((r, i) => r[0].startsWith(view.models[i].name)), "model rows in the view's order");
  check(view.ads.length > 0 && drawn.ads.length === view.ads.length, "a row per busiest ad");
  check(drawn.ads[0][0] === view.ads[0].ad_id, "the busiest ad first");
  check(drawn.ads[0][1] === Math.round(view.ads[0].impressions).toLocaleString("en-US"), "its impressions as in the view");
  check(drawn.partitions.length === view.partitions.length && view.partitions.length > 0, "a row per partition");
  check(drawn.labeled !== "–", "the labeled rate is shown");
  check(view.records.learned > 0, "learned records are counted");

  await page.screenshot({ path: screenshot, fullPage: true });
  Object.assign(summary, {
    models: modelNames,
    points: drawn.charts["c-ne"].points,
    ink: drawn.ink,
    reliabilityPoints: drawn.reliabilityPoints,
    ads: drawn.ads.length,
    partitions: drawn.partitions.length,
    learned: view.records.learned,
    screenshot,
  });
} catch (e) {
  failed = e;
} finally {
  await browser.close();
}
if (failed) {
  console.error(String(failed.stack || failed));
  process.exit(1);
}
console.log(JSON.stringify(summary));
