// rlhfkit view: metric curves on <canvas> and evaluation samples. Plain JS, offline, no libraries.
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

// ------------------------------------------------------------------ curves

function niceTicks(lo, hi, n = 5) {
  const span = hi - lo;
  const raw = span / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= n) || 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

function drawChart(canvas, series) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) return;
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const m = { l: 56, r: 10, t: 8, b: 22 };
  const X = (x) => m.l + (x - x0) / (x1 - x0) * (w - m.l - m.r);
  const Y = (y) => h - m.b - (y - y0) / (y1 - y0) * (h - m.t - m.b);
  ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#667085"; ctx.strokeStyle = "#eaecf0"; ctx.lineWidth = 1;
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (const t of niceTicks(y0, y1)) {
    ctx.beginPath(); ctx.moveTo(m.l, Y(t)); ctx.lineTo(w - m.r, Y(t)); ctx.stroke();
    ctx.fillText(fmt(t), m.l - 4, Y(t));
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (const t of niceTicks(x0, x1)) ctx.fillText(fmt(t), X(t), h - m.b + 4);
  ctx.strokeStyle = "#98a2b3"; ctx.strokeRect(m.l, m.t, w - m.l - m.r, h - m.t - m.b);
  for (const s of series) {
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 1.6;
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    if (s.points.length === 1) { ctx.beginPath(); ctx.arc(X(s.points[0][0]), Y(s.points[0][1]), 3, 0, 7); ctx.fill(); }
  }
}

function metricNames() {
  const names = new Set();
  for (const st of Object.values(state))
    for (const row of st.rows)
      for (const [k, v] of Object.entries(row)) if (k !== "step" && typeof v === "number") names.add(k);
  const rank = (k) => (PRIORITY.includes(k) ? PRIORITY.indexOf(k) : PRIORITY.length);
  return [...names].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

function drawAll() {
  const names = metricNames();
  $("curves").classList.toggle("hidden", names.length === 0);
  const charts = $("charts");
  for (const name of names) {
    let box = charts.querySelector(`[data-metric="${CSS.escape(name)}"]`);
    if (!box) {
      box = el("div", null, "card chart"); box.dataset.metric = name;
      box.appendChild(el("h3", name)); box.appendChild(document.createElement("canvas"));
      charts.appendChild(box);
    }
    const series = Object.values(state).filter((st) => st.rows.length).map((st) => ({
      color: COLORS[st.info.id % COLORS.length],
      points: st.rows.filter((r) => typeof r[name] === "number" && typeof r.step === "number").map((r) => [r.step, r[name]]),
    }));
    drawChart(box.querySelector("canvas"), series);
    box.dataset.points = String(series.reduce((n, s) => n + s.points.length, 0));
  }
  const legend = $("legend"); legend.replaceChildren();
  for (const st of Object.values(state)) {
    if (!st.rows.length) continue;
    const span = el("span"); const swatch = el("i");
    swatch.style.background = COLORS[st.info.id % COLORS.length];
    span.appendChild(swatch); span.appendChild(document.createTextNode(`${st.info.name} (${st.info.status})`));
    legend.appendChild(span);
  }
}

function renderRuns() {
  const body = $("runs").querySelector("tbody"); body.replaceChildren();
  for (const st of Object.values(state)) {
    const tr = el("tr");
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
  $("live").textContent = live ? `live: refreshing every ${pollSeconds} s` : "all runs finished";
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  if (live) setTimeout(poll, pollSeconds * 1000);
}

window.addEventListener("resize", drawAll);
poll();
