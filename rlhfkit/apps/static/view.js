// rlhfkit view: metric curves (uPlot, vendored) and evaluation samples. Plain JS, offline.
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("token");
const COLORS = ["#2e62d9", "#d9480f", "#1a7f37", "#9c36b5", "#c92a2a", "#0b7285", "#e67700", "#495057"];
const PRIORITY = ["reward/mean", "kl", "loss", "approx_kl", "clipfrac", "rewards/margins",
                  "rewards/accuracies", "tokens_per_second"];
const state = {};        // run id -> {info, rows, offset}
let pollSeconds = 2;
const $ = (id) => document.getElementById(id);

async function api(path) {
  const headers = token ? { "X-Rlhfkit-Token": token } : {};
  const resp = await fetch(path, { headers });
  const body = await resp.json().catch(() => ({ error: resp.statusText }));
  if (!resp.ok) throw new Error(body.error || resp.statusText);
  return body;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function fmt(v) {
  if (typeof v !== "number") return v === null || v === undefined ? "" : String(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e7) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  return String(Number(v.toPrecision(4)));
}

function flatten(obj, prefix = "", out = {}) {
  for (const [k, v] of Object.entries(obj || {})) {
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, prefix + k + ".", out);
    else out[prefix + k] = v;
  }
  return out;
}

// ------------------------------------------------------------------ curves (uPlot)

// metric groups, first match wins (TensorBoard-style sections); anything else is "other"
const GROUPS = [
  ["reward", /reward|score|margin|accurac|win_rate|toxicity/i],
  ["KL", /(^|[/_])kl($|[/_])|kl_coef|entropy/i],
  ["losses", /loss|clipfrac|value|advantage|explained_variance|grad_norm|ratio|perplexity/i],
  ["speed", /per_second|seconds|_time|time_|throughput|rss|memory|_mb$|lr$|learning_rate/i],
];
const STEP_INCRS = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6].map((p) => m * p)).sort((a, b) => a - b);
const charts = new Map();  // metric -> {box, plot, key}
const ui = { search: "", smooth: 0, log: false };

function groupOf(name) {
  for (const [g, re] of GROUPS) if (re.test(name)) return g;
  return "other";
}

// TensorBoard's smoothing: exponential moving average with debiasing; gaps (null) are skipped
function ema(values, w) {
  if (!w) return values;
  let last = 0, n = 0;
  return values.map((v) => {
    if (v === null || !Number.isFinite(v)) return null;
    last = last * w + (1 - w) * v; n++;
    return last / (1 - Math.pow(w, n));
  });
}

function metricNames() {
  const names = new Set();
  for (const st of Object.values(state))
    for (const row of st.rows)
      for (const [k, v] of Object.entries(row)) if (k !== "step" && typeof v === "number") names.add(k);
  const rank = (k) => (PRIORITY.includes(k) ? PRIORITY.indexOf(k) : PRIORITY.length);
  return [...names].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

function runsWithRows() { return Object.values(state).filter((st) => st.rows.length); }

function chartData(name) {
  const runs = runsWithRows();
  const steps = new Set();
  const per = runs.map((st) => {
    const m = new Map();
    for (const r of st.rows) if (typeof r[name] === "number" && typeof r.step === "number") { m.set(r.step, r[name]); steps.add(r.step); }
    return m;
  });
  const xs = [...steps].sort((a, b) => a - b);
  const data = [xs];
  const series = [{ label: "step" }];
  let points = 0, positive = true;
  runs.forEach((st, i) => {
    const color = COLORS[st.info.id % COLORS.length];
    const raw = xs.map((x) => (per[i].has(x) ? per[i].get(x) : null));
    points += per[i].size;
    for (const v of per[i].values()) if (!(v > 0)) positive = false;
    if (ui.smooth > 0) {
      data.push(raw); series.push({ label: `${st.info.name} (raw)`, stroke: color + "44", width: 1, spanGaps: true });
      data.push(ema(raw, ui.smooth)); series.push({ label: st.info.name, stroke: color, width: 2, spanGaps: true });
    } else {
      data.push(raw);
      series.push({ label: st.info.name, stroke: color, width: 1.6, spanGaps: true, points: { show: per[i].size < 60 } });
    }
  });
  return { data, series, points, positive };
}

function plotOpts(name, series, positive, width) {
  return {
    width, height: 230,
    series,
    cursor: { sync: { key: "rlhfkit" }, drag: { x: true, y: false } },  // drag zooms x; double-click resets
    scales: { x: { time: false }, y: { distr: ui.log ? (positive ? 3 : 4) : 1 } },  // 3 log10, 4 symlog
    axes: [
      { label: "step", labelSize: 18, size: 36, incrs: STEP_INCRS },  // whole steps only
      { label: name + (ui.log ? (positive ? " (log)" : " (symlog)") : ""), labelSize: 18, size: 60,
        values: (u, ticks) => ticks.map(fmt) },
    ],
    legend: { live: true },
  };
}

function drawAll() {
  const q = ui.search.trim().toLowerCase();
  const all = metricNames();
  const names = all.filter((n) => !q || n.toLowerCase().includes(q));
  $("curves").classList.toggle("hidden", all.length === 0);
  const groupsEl = $("groups");
  for (const name of all) {
    const g = groupOf(name);
    let sec = groupsEl.querySelector(`details[data-group="${g}"]`);
    if (!sec) {
      sec = el("details", null, "group"); sec.dataset.group = g; sec.open = true;
      const sum = el("summary", g); sum.appendChild(el("span", "", "count"));
      sec.append(sum, el("div", null, "charts"));
      // groups in a fixed order: reward, KL, losses, speed, other
      const order = [...GROUPS.map((x) => x[0]), "other"];
      const after = [...groupsEl.children].find((c) => order.indexOf(c.dataset.group) > order.indexOf(g));
      groupsEl.insertBefore(sec, after || null);
    }
    let c = charts.get(name);
    if (!c) {
      const box = el("div", null, "card chart"); box.dataset.metric = name;
      box.append(el("h3", name), el("div", null, "plot"));
      sec.querySelector(".charts").appendChild(box);
      c = { box, plot: null, key: "" };
      charts.set(name, c);
    }
    c.box.classList.toggle("hidden", !names.includes(name));
    const { data, series, points, positive } = chartData(name);
    const key = JSON.stringify([series.map((s) => s.label), ui.smooth > 0, ui.log, positive]);
    const width = Math.max(c.box.querySelector(".plot").clientWidth, 200);
    if (c.plot && c.key === key && c.points === points) {
      // nothing new: leave the chart (and the cursor's hover values) alone
    } else if (c.plot && c.key === key) {
      const x = c.plot.scales.x;
      const zoomed = c.full && (x.min !== c.full[0] || x.max !== c.full[1]);
      c.plot.setData(data, !zoomed);  // a chart the user zoomed keeps its zoom while new steps arrive
      if (!zoomed) c.full = [c.plot.scales.x.min, c.plot.scales.x.max];
    } else if (!c.box.classList.contains("hidden")) {
      if (c.plot) c.plot.destroy();
      c.plot = new uPlot(plotOpts(name, series, positive, width), data, c.box.querySelector(".plot"));
      c.full = [c.plot.scales.x.min, c.plot.scales.x.max];
      c.box._plot = c.plot;
      c.key = key;
    }
    c.points = c.plot ? points : undefined;
    c.box.dataset.points = String(points);
  }
  for (const sec of groupsEl.children) {
    const shown = sec.querySelectorAll(".chart:not(.hidden)").length;
    sec.querySelector(".count").textContent = ` (${shown})`;
    sec.classList.toggle("hidden", shown === 0);
  }
  const legend = $("legend"); legend.replaceChildren();
  for (const st of runsWithRows()) {
    const span = el("span"); const swatch = el("i");
    swatch.style.background = COLORS[st.info.id % COLORS.length];
    span.appendChild(swatch); span.appendChild(document.createTextNode(`${st.info.name} (${st.info.status})`));
    legend.appendChild(span);
  }
}

function resizeAll() {
  for (const c of charts.values()) if (c.plot) c.plot.setSize({ width: Math.max(c.box.querySelector(".plot").clientWidth, 200), height: 230 });
}

// ------------------------------------------------------------------ config diff

const picked = new Set();

function renderDiff() {
  const box = $("diff");
  const runs = [...picked].map((id) => state[id]).filter((st) => st && st.info.config_values);
  box.replaceChildren();
  box.classList.toggle("hidden", runs.length < 2);
  if (runs.length < 2) return;
  const keys = [...new Set(runs.flatMap((st) => Object.keys(st.info.config_values)))].sort();
  const show = (v) => (v === undefined ? "(absent)" : typeof v === "string" ? v : JSON.stringify(v));
  const changed = keys.filter((k) => new Set(runs.map((st) => show(st.info.config_values[k]))).size > 1);
  box.appendChild(el("h3", `config diff: ${changed.length} of ${keys.length} keys differ`));
  const t = el("table", null, "diff");
  const head = el("tr"); head.appendChild(el("th", "key"));
  runs.forEach((st) => head.appendChild(el("th", st.info.name)));
  t.appendChild(head);
  for (const k of changed) {
    const tr = el("tr"); tr.dataset.key = k; tr.appendChild(el("td", k));
    runs.forEach((st) => tr.appendChild(el("td", show(st.info.config_values[k]), "changed")));
    t.appendChild(tr);
  }
  if (!changed.length) { const tr = el("tr"); tr.appendChild(el("td", "the configs are identical", "same")); t.appendChild(tr); }
  box.appendChild(t);
}

function renderRuns() {
  const body = $("runs").querySelector("tbody"); body.replaceChildren();
  for (const st of Object.values(state)) {
    const tr = el("tr");
    const pick = el("td", null, "pick");
    if (st.info.config_values) {
      const cb = el("input"); cb.type = "checkbox"; cb.checked = picked.has(st.info.id);
      cb.title = "compare this run's config"; cb.dataset.run = st.info.name;
      cb.addEventListener("change", () => { if (cb.checked) picked.add(st.info.id); else picked.delete(st.info.id); renderDiff(); });
      pick.appendChild(cb);
    }
    tr.appendChild(pick);
    tr.appendChild(el("td", st.info.name));
    tr.appendChild(el("td", st.info.status));
    const last = st.rows.length ? st.rows[st.rows.length - 1].step : "";
    tr.appendChild(el("td", fmt(last), "num"));
    const summary = flatten(st.info.summary || {});
    tr.appendChild(el("td", Object.entries(summary).map(([k, v]) => `${k}=${fmt(v)}`).join("  ")));
    tr.dataset.status = st.info.status;
    body.appendChild(tr);
  }
}

// ------------------------------------------------------------------ evaluation

function kvTable(obj) {
  const t = el("table", null, "kv");
  for (const [k, v] of Object.entries(flatten(obj))) {
    const tr = el("tr"); tr.appendChild(el("td", k)); tr.appendChild(el("td", fmt(v), "num")); t.appendChild(tr);
  }
  return t;
}

async function renderEval(info) {
  const box = el("section", null, "card eval"); box.dataset.run = info.name;
  box.appendChild(el("h2", `evaluation: ${info.name}`));
  if (info.eval_metrics) box.appendChild(kvTable(info.eval_metrics));
  for (const name of info.images) {
    const img = el("img", null, "plot");
    img.alt = name;
    img.src = `api/runs/${info.id}/images/${encodeURIComponent(name)}` + (token ? `?token=${encodeURIComponent(token)}` : "");
    box.appendChild(img);
  }
  if (info.has_report) {
    const det = el("details"); det.appendChild(el("summary", "report.md"));
    det.appendChild(el("pre", (await api(`api/runs/${info.id}/report`)).text, "text"));
    box.appendChild(det);
  }
  if (info.has_samples) box.appendChild(await samplesTable(info));
  $("evals").appendChild(box);
}

async function samplesTable(info) {
  const data = await api(`api/runs/${info.id}/samples?limit=2000`);
  const rows = data.rows;
  const labels = [...new Set(rows.flatMap((r) => Object.keys(r.completions || {})))];
  const rlabels = [...new Set(rows.flatMap((r) => Object.keys(r.rewards || {})))];
  const wrap = el("div");
  // before/after comparison: mean reward per model, share of prompts that improved
  const means = rlabels.map((l) => {
    const v = rows.map((r) => (r.rewards || {})[l]).filter((x) => typeof x === "number");
    return `${l}: ${fmt(v.reduce((a, b) => a + b, 0) / (v.length || 1))}`;
  });
  const gains = rows.map((r) => r.gain).filter((g) => typeof g === "number");
  const better = gains.filter((g) => g > 0).length;
  wrap.appendChild(el("p", `${data.total} samples; mean reward ${means.join(", ")}` +
    (gains.length ? `; improved on ${better}/${gains.length} prompts` : ""), "comparison"));
  const filter = el("input"); filter.type = "text"; filter.placeholder = "filter text";
  wrap.appendChild(filter);
  const table = el("table", null, "samples");
  const head = el("tr");
  const cols = ["#", "prompt", ...labels, ...rlabels.map((l) => `reward ${l}`), "gain"];
  cols.forEach((c) => head.appendChild(el("th", c)));
  table.appendChild(head);
  let order = rows.map((_, i) => i);
  let sortDir = 0;
  function fill() {
    while (table.rows.length > 1) table.deleteRow(1);
    const q = filter.value.toLowerCase();
    for (const i of order) {
      const r = rows[i];
      const texts = [r.prompt, ...labels.map((l) => (r.completions || {})[l])];
      if (q && !texts.some((t) => String(t || "").toLowerCase().includes(q))) continue;
      const tr = el("tr");
      tr.appendChild(el("td", String(i + 1), "num"));
      texts.forEach((t) => { const td = el("td"); td.appendChild(el("pre", t, "text")); tr.appendChild(td); });
      rlabels.forEach((l) => tr.appendChild(el("td", fmt((r.rewards || {})[l]), "num")));
      const g = r.gain;
      tr.appendChild(el("td", fmt(g), "num " + (g > 0 ? "pos" : g < 0 ? "neg" : "")));
      table.appendChild(tr);
    }
  }
  head.lastChild.title = "click to sort";
  head.lastChild.addEventListener("click", () => {
    sortDir = sortDir === -1 ? 1 : -1;  // first click: largest gain first
    const key = (i) => (typeof rows[i].gain === "number" ? rows[i].gain : -Infinity);
    order = rows.map((_, i) => i).sort((a, b) => sortDir * (key(a) - key(b)));
    fill();
  });
  filter.addEventListener("input", fill);
  fill();
  wrap.appendChild(table);
  return wrap;
}

// ------------------------------------------------------------------ polling

async function poll() {
  let live = false;
  try {
    const data = await api("api/runs");
    pollSeconds = data.poll_seconds || pollSeconds;
    for (const info of data.runs) {
      const st = state[info.id] || (state[info.id] = { info, rows: [], offset: 0, fetchedFinal: false, evalShown: false });
      st.info = info;
      if (info.has_metrics && !st.fetchedFinal) {
        const m = await api(`api/runs/${info.id}/metrics?offset=${st.offset}`);
        if (m.reset) st.rows = [];
        st.rows.push(...m.rows);
        st.offset = m.offset;
        st.fetchedFinal = m.status === "finished";
      }
      if (info.status !== "finished") live = true;
      const isEval = info.has_samples || info.eval_metrics || info.has_report;
      if (isEval && info.status === "finished" && !st.evalShown) { st.evalShown = true; await renderEval(info); }
    }
    renderRuns();
    drawAll();
    $("status").textContent = "";
  } catch (e) {
    $("status").textContent = "error: " + e.message;
    live = true;
  }
  $("live").textContent = live ? `live: refreshing every ${pollSeconds} s`
    : `all runs finished; looking for new runs every ${5 * pollSeconds} s`;
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  setTimeout(poll, (live ? 1 : 5) * pollSeconds * 1000);
}

$("search").addEventListener("input", (ev) => { ui.search = ev.target.value; drawAll(); });
$("smooth").addEventListener("input", (ev) => {
  ui.smooth = Number(ev.target.value); $("smooth-value").textContent = ev.target.value; drawAll();
});
$("logscale").addEventListener("change", (ev) => { ui.log = ev.target.checked; drawAll(); });
window.addEventListener("resize", resizeAll);
poll();
