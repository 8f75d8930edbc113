// rlhfkit label: pairwise preference page. Plain JS, no build step, no network beyond this server.
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("token");
const KEYS = { a: "A", arrowleft: "A", b: "B", arrowright: "B", t: "tie", x: "both_bad", s: "skip" };
let annotator = params.get("annotator") || localStorage.getItem("rlhfkit-annotator") || "";
let current = null;      // the pair on screen
let shownAt = 0;         // performance.now() when it appeared
let busy = false;        // a request is in flight: no second submit

const $ = (id) => document.getElementById(id);

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function api(path, options = {}) {
  const headers = Object.assign({ "Content-Type": "application/json" }, options.headers || {});
  if (token) headers["X-Rlhfkit-Token"] = token;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  let body = null;
  try { body = await resp.json(); } catch (e) { body = { error: resp.statusText }; }
  if (!resp.ok) {
    const err = new Error(body.error || resp.statusText);
    err.status = resp.status;
    throw err;
  }
  return body;
}

function show(section) {
  for (const id of ["login", "work", "done"]) $(id).classList.toggle("hidden", id !== section);
}

function buildRatings() {
  for (const box of document.querySelectorAll(".rating")) {
    const side = box.dataset.side;
    for (let v = 1; v <= 7; v++) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "radio"; input.name = "rating" + side; input.value = String(v);
      label.appendChild(input);
      label.appendChild(document.createTextNode(" " + v));
      box.appendChild(label);
    }
  }
}

function rating(side) {
  const checked = document.querySelector(`input[name=rating${side}]:checked`);
  return checked ? Number(checked.value) : null;
}

function render(data) {
  const p = data.progress;
  $("progress").textContent = `${p.done} / ${p.total} labelled`;
  $("who").textContent = data.annotator;
  current = data.pair;
  if (!current) { show("done"); setStatus(""); return; }
  $("prompt").textContent = current.prompt;
  $("textA").textContent = current.A;
  $("textB").textContent = current.B;
  $("work").dataset.pairId = String(current.id);
  $("note").value = "";
  for (const r of document.querySelectorAll(".rating input")) r.checked = false;
  for (const r of document.querySelectorAll(".resp")) r.classList.remove("picked");
  show("work");
  shownAt = performance.now();
  setBusy(false);
  window.scrollTo(0, 0);
}

function setBusy(value) {
  busy = value;
  for (const b of document.querySelectorAll("button[data-choice]")) b.disabled = value;
}

async function loadNext() {
  setBusy(true);
  const slow = setTimeout(() => setStatus("preparing the next pair..."), 400);
  try {
    render(await api("api/next?annotator=" + encodeURIComponent(annotator)));
    setStatus("");
  } catch (e) {
    setStatus("error: " + e.message, true);
  } finally {
    clearTimeout(slow);
  }
}

async function submit(choice) {
  if (busy || !current) return;
  setBusy(true);
  if (choice === "A" || choice === "B") $("resp" + choice).classList.add("picked");
  const body = {
    pair_id: current.id, annotator, choice,
    rating_A: rating("A"), rating_B: rating("B"),
    note: $("note").value.trim() || null,
    elapsed_ms: Math.round(performance.now() - shownAt),
  };
  const slow = setTimeout(() => setStatus("saving..."), 400);
  try {
    render(await api("api/judgements", { method: "POST", body: JSON.stringify(body) }));
    setStatus(`saved (${choice})`);
  } catch (e) {
    if (e.status === 409) { await loadNext(); setStatus("that pair was already saved; here is the next one"); }
    else { setStatus("not saved: " + e.message, true); setBusy(false); }
  } finally {
    clearTimeout(slow);
  }
}

async function start(name) {
  annotator = name.trim();
  if (document.activeElement) document.activeElement.blur();  // keys go to the page, not the name box
  localStorage.setItem("rlhfkit-annotator", annotator);
  params.set("annotator", annotator);
  history.replaceState(null, "", "?" + params.toString());
  await loadNext();
}

async function init() {
  buildRatings();
  for (const b of document.querySelectorAll("button[data-choice]")) {
    b.addEventListener("click", () => submit(b.dataset.choice));
  }
  document.addEventListener("keydown", (ev) => {
    // keys label, except while writing (the note or the name box); a clicked rating keeps them working
    const typing = ev.target.tagName === "TEXTAREA" || (ev.target.tagName === "INPUT" && ev.target.type === "text");
    if (typing) { if (ev.key === "Escape") ev.target.blur(); return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey || $("work").classList.contains("hidden")) return;
    const key = ev.key.toLowerCase();
    if (key === "n") { ev.preventDefault(); $("note").focus(); return; }
    if (KEYS[key]) { ev.preventDefault(); submit(KEYS[key]); }
  });
  $("login-form").addEventListener("submit", (ev) => { ev.preventDefault(); start($("name").value); });
  try {
    const info = await api("api/info");
    $("instructions").textContent = info.instructions;
    for (const name of info.annotators) {
      const b = document.createElement("button");
      b.type = "button"; b.textContent = name;
      b.addEventListener("click", () => start(name));
      $("names").appendChild(b);
    }
  } catch (e) {
    setStatus("error: " + e.message, true);
    return;
  }
  if (annotator) await start(annotator); else { show("login"); $("name").focus(); }
}

init();
