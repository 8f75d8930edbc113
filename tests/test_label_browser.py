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
                page.check("#respA input[value='6']")
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
        page.wait_for_function("document.getElementById('live').textContent === 'all runs finished'")
        polls = int(page.get_attribute("body", "data-polls"))
        page.wait_for_timeout(1000)
        assert int(page.get_attribute("body", "data-polls")) == polls  # polling stopped
