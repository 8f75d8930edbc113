// rlhfkit label: pairwise preference page. Plain JS, no build step, no network beyond this server.
// Texts are rendered by render.js (marked + DOMPurify, vendored).
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("token");
const KEYS = { a: "A", arrowleft: "A", b: "B", arrowright: "B", t: "tie", x: "both_bad", s: "skip" };
let annotator = params.get("annotator") || localStorage.getItem("rlhfkit-annotator") || "";
let current = null;      // the pair on screen
let shownAt = 0;         // performance.now() when it appeared
let busy = false;        // a request is in flight: no second submit
let doneCount = 0;       // this annotator's judgements (undo is possible when > 0)
let guidelines = null;   // markdown text of the guidelines file, if configured

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
    const scale = document.createElement("span");
    scale.className = "scale";
    for (let v = 1; v <= 7; v++) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "radio"; input.name = "rating" + side; input.value = String(v);
      const span = document.createElement("span");
      span.textContent = String(v);
      label.append(input, span);
      scale.appendChild(label);
    }
    box.appendChild(scale);
  }
}

function rating(side) {
  const checked = document.querySelector(`input[name=rating${side}]:checked`);
  return checked ? Number(checked.value) : null;
}

function setRating(side, value) {
  for (const r of document.querySelectorAll(`input[name=rating${side}]`)) r.checked = value !== null && Number(r.value) === value;
}

function setProgress(p) {
  $("progress").textContent = `${p.done} / ${p.total} labelled`;
  $("bar").max = Math.max(p.total, 1);
  $("bar").value = p.done;
  doneCount = p.done;
  for (const b of document.querySelectorAll("button.undo")) b.disabled = busy || doneCount === 0;
}

function render(data, previous = null) {
  setProgress(data.progress);
  $("who").textContent = data.annotator;
  current = data.pair;
  if (!current) { show("done"); setBusy(false); return; }
  RLHFKIT_RENDER.render($("prompt"), current.prompt);
  RLHFKIT_RENDER.render($("textA"), current.A);
  RLHFKIT_RENDER.render($("textB"), current.B);
  for (const id of ["prompt", "textA", "textB"]) $(id).scrollTop = 0;
  $("work").dataset.pairId = String(current.id);
  $("note").value = previous && previous.note ? previous.note : "";
  setRating("A", previous ? previous.rating_A : null);
  setRating("B", previous ? previous.rating_B : null);
  for (const r of document.querySelectorAll(".resp")) r.classList.remove("picked");
  show("work");
  shownAt = performance.now();
  setBusy(false);
}

function setBusy(value) {
  busy = value;
  for (const b of document.querySelectorAll("button[data-choice]")) b.disabled = value;
  for (const b of document.querySelectorAll("button.undo")) b.disabled = value || doneCount === 0;
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
    setStatus(`saved (${choice}); u undoes`);
  } catch (e) {
    if (e.status === 409) { await loadNext(); setStatus("that pair was already saved; here is the next one"); }
    else { setStatus("not saved: " + e.message, true); setBusy(false); }
  } finally {
    clearTimeout(slow);
  }
}

async function undo() {
  if (busy || doneCount === 0) return;
  setBusy(true);
  try {
    const data = await api("api/undo", { method: "POST", body: JSON.stringify({ annotator }) });
    render(data, data.undone);
    setStatus(`undone: your "${data.undone.choice}" on this pair; judge it again`);
  } catch (e) {
    setStatus("not undone: " + e.message, true);
    setBusy(false);
  }
}

function openGuide(open) {
  $("guide").classList.toggle("hidden", !open);
  if (open) $("guide").scrollTop = 0;
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
  for (const b of document.querySelectorAll("button.undo")) b.addEventListener("click", undo);
  $("guide-open").addEventListener("click", () => openGuide(true));
  $("guide-close").addEventListener("click", () => openGuide(false));
  document.addEventListener("keydown", (ev) => {
    // keys label, except while writing (the note or the name box); a clicked rating keeps them working
    const typing = ev.target.tagName === "TEXTAREA" || (ev.target.tagName === "INPUT" && ev.target.type === "text");
    if (typing) { if (ev.key === "Escape") ev.target.blur(); return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const guideOpen = !$("guide").classList.contains("hidden");
    if (ev.key === "Escape" && guideOpen) { openGuide(false); return; }
    const key = ev.key.toLowerCase();
    if (key === "g" && guidelines) { ev.preventDefault(); openGuide(!guideOpen); return; }
    if (guideOpen) return;
    if (key === "u" && $("login").classList.contains("hidden")) { ev.preventDefault(); undo(); return; }
    if ($("work").classList.contains("hidden")) return;
    const digit = /^Digit([1-7])$/.exec(ev.code);  // layout-independent: Shift+1 is "!" on many keyboards
    if (digit) { ev.preventDefault(); setRating(ev.shiftKey ? "B" : "A", Number(digit[1])); return; }
    if (key === "n") { ev.preventDefault(); $("note").focus(); return; }
    if (KEYS[key]) { ev.preventDefault(); submit(KEYS[key]); }
  });
  $("login-form").addEventListener("submit", (ev) => { ev.preventDefault(); start($("name").value); });
  try {
    const info = await api("api/info");
    $("instructions").textContent = info.instructions;
    guidelines = info.guidelines || null;
    if (guidelines) {
      $("guide-text").innerHTML = RLHFKIT_RENDER.markdown(guidelines);
      $("login-guidelines").innerHTML = RLHFKIT_RENDER.markdown(guidelines);
      $("login-guidelines").classList.remove("hidden");
      $("guide-open").classList.remove("hidden");
    }
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
