"""Headless Chromium drives the real pages: label three pairs with the keyboard, watch a live run.

Needs Debian's ``chromium`` (/usr/bin/chromium) and the ``playwright`` Python package; Playwright's
own browser download is never used (scripts/ci_browser_deps.sh installs both).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rlhfkit.apps.common import BackgroundServer
from rlhfkit.apps.label import LabelConfig, build_app, export
from rlhfkit.apps.view import ViewApp, discover_runs
from rlhfkit.config import load_config
from rlhfkit.utils import read_jsonl

pytestmark = pytest.mark.unit

CHROMIUM = "/usr/bin/chromium"
# screenshots the tests save for review (git-ignored); RLHFKIT_SCREENSHOTS moves them
SCREENSHOTS = Path(os.environ.get("RLHFKIT_SCREENSHOTS", Path(__file__).parent / "screenshots"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium; see scripts/ci_browser_deps.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    pg = browser.new_page()
    pg.set_default_timeout(15_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    pg.close()
    assert errors == [], f"JavaScript errors: {errors}"


def test_label_three_pairs_with_the_keyboard(tmp_path: Path, page):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Helpful answer {i}", "rejected": f"Rude answer {i}"}
            for i in range(3)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(LabelConfig, None, [f"path={tmp_path / 'pairs.jsonl'}", f"db={tmp_path / 'l.sqlite'}",
                                          f"export.output={tmp_path / 'prefs.jsonl'}"])
    app = build_app(cfg)
    with BackgroundServer(app.app) as srv:
        page.goto(srv.url + "/")
        page.fill("#name", "alice")
        page.press("#name", "Enter")
        shown = []
        for i, key in enumerate(["a", "ArrowRight", "t"]):
            page.wait_for_selector("#work:not(.hidden)")
            pair_id = page.get_attribute("#work", "data-pair-id")
            assert page.inner_text("#prompt") == f"Question {i}?"
            shown.append((page.inner_text("#textA"), page.inner_text("#textB")))
            if i == 0:  # rate A 6 (mouse), write a note with the keyboard, then back to the keys
                page.click("#respA .scale label:nth-child(6)")
                page.keyboard.press("n")
                page.keyboard.type("clear winner")
                page.keyboard.press("Escape")
            page.keyboard.press(key)
            page.wait_for_function(
                "id => document.getElementById('work').dataset.pairId !== id"
                " || !document.getElementById('done').classList.contains('hidden')", arg=pair_id)
        page.wait_for_selector("#done:not(.hidden)")
        assert page.inner_text("#progress") == "3 / 3 labelled"
        assert page.evaluate("localStorage.getItem('rlhfkit-annotator')") == "alice"

    judged = app.store.judgement_rows()
    assert [j["pressed"] for j in judged] == ["A", "B", "tie"]
    assert judged[0]["note"] == "clear winner" and judged[0]["elapsed_ms"] > 0
    report = export(cfg)
    out = read_jsonl(tmp_path / "prefs.jsonl")
    # pair 0: what was shown as A wins; pair 1: what was shown as B wins; the tie is dropped
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in out] == [
        ("Question 0?", shown[0][0], shown[0][1]), ("Question 1?", shown[1][1], shown[1][0])]
    assert out[0]["chosen_rating"] == 6 and out[0]["annotators"] == ["alice"]
    assert report["dropped"] == {"tie": 1}


XSS = '<script>window.__pwned = 1</script> <img src=x onerror="window.__pwned = 2">'
CODE = "Use this:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nThen **call** it."
LONG = "\n\n".join(f"Paragraph {i}: " + "a long answer " * 12 for i in range(60))
CHAT = "Human: hi there\n\nAssistant: Hello! How can I help?\n\nHuman: write `code` please"


def test_label_renders_safely_undoes_and_fits_a_phone(tmp_path: Path, browser):
    """Markdown, code and chat turns render; script/onerror payloads stay text and never run; long
    responses scroll inside their panes with the buttons in view; keys rate and undo; 390x844 fits."""
    rows = [
        {"prompt": "Explain " + XSS, "chosen": CODE, "rejected": LONG + "\n\n[x](javascript:window.__pwned=3) " + XSS},
        {"prompt": CHAT, "chosen": "Sure: `print(1)` " + XSS, "rejected": "No."},
        {"prompt": "Third?", "chosen": "yes", "rejected": "no"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "guide.md").write_text("# Guidelines\n\n- Prefer **correct** answers\n- Code must run\n")
    cfg = load_config(LabelConfig, None, [f"path={tmp_path / 'pairs.jsonl'}", f"db={tmp_path / 'l.sqlite'}",
                                          f"guidelines={tmp_path / 'guide.md'}"])
    app = build_app(cfg)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with BackgroundServer(app.app) as srv:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/")
        page.wait_for_selector("#login-guidelines strong")
        assert page.inner_text("#login-guidelines strong") == "correct"
        assert page.evaluate("DOMPurify.version") == "3.5.0"  # the vendored sanitiser is what runs
        page.fill("#name", "alice")
        page.press("#name", "Enter")
        page.wait_for_selector("#work:not(.hidden)")
        first = page.get_attribute("#work", "data-pair-id")
        # the payloads are shown as text and never run
        assert XSS in page.inner_text("#prompt")
        assert page.evaluate("window.__pwned") is None
        assert page.eval_on_selector_all("#work script, #work img, #work [onerror]", "els => els.length") == 0
        assert page.eval_on_selector_all("#work a", "as => as.map(a => a.getAttribute('href'))") in ([None], [])
        side = "A" if "Use this" in page.inner_text("#textA") else "B"  # the A/B order is a coin flip
        code = f"#text{side} pre code.language-python"
        assert page.inner_text(code).rstrip() == "def add(a, b):\n    return a + b"
        assert page.eval_on_selector(code, "c => getComputedStyle(c).fontFamily").startswith("ui-monospace")
        # the long response scrolls inside its pane; buttons and both rating rows stay in view, aligned
        other = "B" if side == "A" else "A"
        assert page.eval_on_selector(f"#text{other}", "e => e.scrollHeight > e.clientHeight + 500")
        boxes = {sel: page.locator(sel).bounding_box() for sel in (
            "button[data-choice='skip']", "button.undo >> nth=0", "#respA .rating", "#respB .rating", "#note")}
        assert all(b["y"] + b["height"] <= 800 for b in boxes.values()), boxes
        assert boxes["#respA .rating"]["y"] == boxes["#respB .rating"]["y"]
        page.keyboard.press("6")  # rate A 6, B 2 (Shift+digit), then A is better
        page.keyboard.press("Shift+Digit2")
        assert page.eval_on_selector("input[name=ratingA]:checked", "i => i.value") == "6"
        assert page.eval_on_selector("input[name=ratingB]:checked", "i => i.value") == "2"
        page.screenshot(path=str(SCREENSHOTS / "label_1280x800.png"))
        page.keyboard.press("a")
        page.wait_for_function("id => document.getElementById('work').dataset.pairId !== id", arg=first)
        assert page.evaluate("document.getElementById('bar').value") == 1
        # chat turns
        assert page.eval_on_selector_all("#prompt .turn .role", "rs => rs.map(r => r.textContent)") == [
            "human", "assistant", "human"]
        assert page.inner_text("#prompt .turn:last-child code") == "code"
        page.screenshot(path=str(SCREENSHOTS / "label_chat_1280x800.png"))
        # u undoes: the first pair is back with its ratings; re-judge it B
        page.keyboard.press("u")
        page.wait_for_function("id => document.getElementById('work').dataset.pairId === id", arg=first)
        assert page.eval_on_selector("input[name=ratingA]:checked", "i => i.value") == "6"
        assert page.evaluate("document.getElementById('bar').value") == 0
        assert page.is_disabled("button.undo >> nth=0")  # nothing left to undo
        page.keyboard.press("b")
        page.wait_for_function("id => document.getElementById('work').dataset.pairId !== id", arg=first)
        page.keyboard.press("t")
        page.wait_for_function("() => document.getElementById('bar').value === 2")
        page.keyboard.press("x")
        page.wait_for_selector("#done:not(.hidden)")
        page.click("#done button.undo")  # the button undoes too: the third pair comes back
        page.wait_for_selector("#work:not(.hidden)")
        assert page.inner_text("#prompt") == "Third?"
        page.keyboard.press("s")
        page.wait_for_selector("#done:not(.hidden)")
        # the other chat forms: a JSON list of messages and ChatML
        turns = "t => RLHFKIT_RENDER.turns(t).map(m => m.role + ':' + m.content)"
        assert page.evaluate(turns, '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "**yo**"}]'
                             ) == ["user:hi", "assistant:**yo**"]
        assert page.evaluate(turns, "<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
                             ) == ["system:be nice", "user:hello"]
        assert page.evaluate("RLHFKIT_RENDER.turns('plain text, Human: not a turn')") is None
        page.keyboard.press("g")
        page.wait_for_selector("#guide:not(.hidden) li")
        page.keyboard.press("Escape")
        page.wait_for_selector("#guide", state="hidden")
        assert page.evaluate("window.__pwned") is None
        page.close()

        phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        phone.on("pageerror", lambda e: errors.append(str(e)))
        phone.goto(srv.url + "/?annotator=bob")
        phone.wait_for_selector("#work:not(.hidden)")
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        for sel in ("button[data-choice]", "button.undo >> nth=0", ".rating .scale"):
            for b in (phone.locator(sel).all() if "nth" not in sel else [phone.locator(sel)]):
                box = b.bounding_box()
                assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844, (sel, box)
        a, b = phone.locator("#respA").bounding_box(), phone.locator("#respB").bounding_box()
        assert b["y"] >= a["y"] + a["height"]  # stacked
        phone.screenshot(path=str(SCREENSHOTS / "label_390x844.png"))
        phone.tap("button[data-choice='tie']")
        phone.wait_for_function("() => document.getElementById('bar').value === 1")
        phone.close()
    assert errors == [], f"JavaScript errors: {errors}"
    judged = [(j["annotator"], j["pressed"]) for j in app.store.judgement_rows()]
    assert judged == [("alice", "B"), ("alice", "tie"), ("alice", "skip"), ("bob", "tie")]
    j = app.store.judgement_rows()[0]
    assert (j["rating_a"], j["rating_b"]) == ((2, 6) if j["swapped"] else (6, 2))  # as shown: A 6, B 2


def test_view_draws_curves_and_follows_a_live_run(tmp_path: Path, page):
    run = tmp_path / "ppo"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "reward/mean": 0.1 * s, "kl": 0.02 * s}) + "\n"
                               for s in (1, 2)))
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({"reward": {"before": 0.2, "after": 0.5}}))
    (ev / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "p1", "completions": {"before": "meh", "after": "great"}, "rewards": {"before": 0.1, "after": 0.8},
         "gain": 0.7},
        {"prompt": "p2", "completions": {"before": "fine", "after": "worse"}, "rewards": {"before": 0.4, "after": 0.2},
         "gain": -0.2}]))
    app = ViewApp(discover_runs([str(run), str(ev)]), poll_seconds=0.3)
    with BackgroundServer(app.app) as srv:
        page.goto(srv.url + "/")
        page.wait_for_selector(".chart[data-metric='kl'][data-points='2']")
        assert page.eval_on_selector_all(".chart h3", "hs => hs.map(h => h.textContent)") == ["reward/mean", "kl"]
        inked = page.eval_on_selector(".chart[data-metric='kl'] canvas", """c => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""")
        assert inked > 500  # axes, ticks and the line were drawn
        page.wait_for_selector("table.samples tr:nth-child(3)")
        gains = page.eval_on_selector_all("table.samples tr td:last-child", "tds => tds.map(t => t.className)")
        assert gains == ["num pos", "num neg"]
        assert "improved on 1/2 prompts" in page.inner_text(".comparison")
        with open(metrics, "a") as f:  # the run goes on: the page picks up the new step by polling
            f.write(json.dumps({"step": 3, "reward/mean": 0.35, "kl": 0.07}) + "\n")
        page.wait_for_selector(".chart[data-metric='kl'][data-points='3']")
        (run / "summary.json").write_text(json.dumps({"command": "ppo", "steps": 3}))
        # finished: polling slows down five times (it still looks for new run folders)
        page.wait_for_function("document.getElementById('live').textContent.startsWith('all runs finished')")
        assert page.inner_text("#live") == "all runs finished; looking for new runs every 1.5 s"


def test_view_zoom_smoothing_log_search_groups_config_diff_and_new_runs(tmp_path: Path, browser):
    """uPlot charts: hover values, drag zoom and double-click reset, EMA smoothing (checked by hand),
    log scale, search, groups; a config diff of two ticked runs; a run folder created later appears."""
    def make(name: str, lr: float, losses: list[float]) -> None:
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(f"model: {{name_or_path: tiny}}\ntrain:\n  lr: {lr}\n  max_steps: 3\n")
        (d / "metrics.jsonl").write_text("".join(json.dumps(
            {"step": s, "loss": v, "kl": 0.01 * s, "reward/mean": 0.1 * s, "tokens_per_second": 800 + s, "zz_custom": s})
            + "\n" for s, v in enumerate(losses, start=1)))
        (d / "summary.json").write_text(json.dumps({"command": "sft", "steps": len(losses)}))

    make("a", 1e-5, [4.0, 2.0, 1.0])
    make("b", 3e-5, [5.0, 3.0, 2.0])
    app = ViewApp(discover_runs([str(tmp_path)]), poll_seconds=0.2, roots=[str(tmp_path)])
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with BackgroundServer(app.app) as srv:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/")
        page.wait_for_selector(".chart[data-metric='loss'][data-points='6']")
        groups = page.eval_on_selector_all("details.group", "ds => ds.map(d => [d.dataset.group, "
                                           "[...d.querySelectorAll('.chart')].map(c => c.dataset.metric)])")
        assert groups == [["reward", ["reward/mean"]], ["KL", ["kl"]], ["losses", ["loss"]],
                          ["speed", ["tokens_per_second"]], ["other", ["zz_custom"]]]
        labels = "c => c._plot.axes.map(a => a.label)"  # axis labels (uPlot draws them on the canvas)
        assert page.eval_on_selector(".chart[data-metric='loss']", labels) == ["step", "loss"]
        over = page.locator(".chart[data-metric='loss'] .u-over")
        over.scroll_into_view_if_needed()
        box = over.bounding_box()
        # hover: the legend shows the values under the cursor (right edge: step 3, losses 1 and 2)
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.move(box["x"] + box["width"] - 1, box["y"] + box["height"] / 2, steps=3)
        page.wait_for_function("() => document.querySelector(\".chart[data-metric='loss'] .u-legend .u-value\")"
                               ".textContent !== '--'")
        values = page.eval_on_selector_all(".chart[data-metric='loss'] .u-legend .u-value", "vs => vs.map(v => v.textContent)")
        assert values == ["3", "1", "2"]
        # drag to zoom into steps ~1.4-2.6; double-click resets to 1-3
        page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + 20)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + 20, steps=5)
        page.mouse.up()
        zoom = page.eval_on_selector(".chart[data-metric='loss']", "c => [c._plot.scales.x.min, c._plot.scales.x.max]")
        assert 1.3 < zoom[0] < 1.5 and 2.5 < zoom[1] < 2.7, zoom
        page.mouse.dblclick(box["x"] + box["width"] / 2, box["y"] + 20)
        assert page.eval_on_selector(".chart[data-metric='loss']", "c => [c._plot.scales.x.min, c._plot.scales.x.max]") == [1, 3]
        # smoothing 0.5, TensorBoard's debiased EMA of run a's 4, 2, 1:
        # 2/(1-.5) = 4; (2*.5+2*.5)/(1-.25) = 2.6667; (2*.5+1*.5)/(1-.125) = 1.7143
        page.eval_on_selector("#smooth", "r => { r.value = '0.5'; r.dispatchEvent(new Event('input')); }")
        smoothed = page.eval_on_selector(".chart[data-metric='loss']", "c => c._plot.data[2]")
        assert smoothed == pytest.approx([4.0, 8 / 3, 12 / 7])
        assert page.eval_on_selector(".chart[data-metric='loss']", "c => c._plot.data[1]") == [4, 2, 1]  # raw, faint
        # log scale: log10 where every value is positive
        page.check("#logscale")
        assert page.eval_on_selector(".chart[data-metric='loss']", "c => c._plot.scales.y.distr") == 3
        assert page.eval_on_selector(".chart[data-metric='loss']", labels) == ["step", "loss (log)"]
        page.screenshot(path=str(SCREENSHOTS / "view_1280x900.png"), full_page=True)
        # search: only matching charts (and their groups) stay visible
        page.fill("#search", "kl")
        page.wait_for_selector(".chart[data-metric='loss']", state="hidden")
        visible = page.eval_on_selector_all(".chart:not(.hidden)", "cs => cs.map(c => c.dataset.metric)")
        assert visible == ["kl"]
        page.fill("#search", "")
        # config diff between the two ticked runs: only train.lr differs
        page.check("input[data-run='a']")
        page.check("input[data-run='b']")
        page.wait_for_selector("#diff tr[data-key]")
        rows = page.eval_on_selector_all("#diff tr[data-key]", "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
        assert rows == [["train.lr", "1.0e-05", "3.0e-05"]] or rows == [["train.lr", "1e-05", "3e-05"]], rows
        assert page.text_content("#diff h3") == "config diff: 1 of 3 keys differ"
        # a run folder created now is picked up by the next polls
        make("c", 1e-4, [3.0, 1.0, 0.5])
        page.wait_for_selector(".chart[data-metric='loss'][data-points='9']", timeout=20_000)
        assert "c (finished)" in page.inner_text("#legend")
        page.close()
    assert errors == [], f"JavaScript errors: {errors}"
