"""Labelling app additions of #21: undo, guidelines file, notes in the export, 503 when the database is down."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from rlhfkit.apps.common import BackgroundServer
from rlhfkit.apps.label import LabelConfig, build_app, export_rows
from rlhfkit.config import ConfigError, load_config

pytestmark = pytest.mark.unit


def make_app(tmp_path: Path, *overrides: str):
    rows = [{"prompt": f"prompt {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(LabelConfig, None, [f"db={tmp_path / 'labels.sqlite'}", f"path={tmp_path / 'pairs.jsonl'}",
                                          *overrides])
    return cfg, build_app(cfg)


def test_undo_deletes_only_the_annotators_own_last_judgements(tmp_path):
    cfg, app = make_app(tmp_path)
    with BackgroundServer(app.app) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        def judge(name, choice, **kw):
            pair = c.get("/api/next", params={"annotator": name}).json()["pair"]
            r = c.post("/api/judgements", json={"pair_id": pair["id"], "annotator": name, "choice": choice, **kw})
            assert r.status_code == 201
            return pair

        first = judge("alice", "A", rating_A=6, rating_B=2, note="A cites a source")
        second = judge("alice", "tie")
        judge("bob", "B")
        assert c.post("/api/undo", json={"annotator": "cy"}).status_code == 404  # unknown annotator: nothing
        r = c.post("/api/undo", json={"annotator": "alice"})
        assert r.status_code == 200
        body = r.json()
        assert body["undone"]["pair_id"] == second["id"] and body["undone"]["choice"] == "tie"
        assert body["pair"] == second  # the same pair, the same sides, to judge again
        assert body["progress"] == {"done": 1, "remaining": 2, "total": 3}
        # a second undo takes the one before, with what the annotator saw (ratings in shown order)
        body = c.post("/api/undo", json={"annotator": "alice"}).json()
        assert body["pair"] == first
        assert body["undone"] | {"judgement_id": 0} == {"judgement_id": 0, "pair_id": first["id"], "choice": "A",
                                                        "rating_A": 6, "rating_B": 2, "note": "A cites a source"}
        r = c.post("/api/undo", json={"annotator": "alice"})
        assert r.status_code == 404 and "no judgement to undo" in r.json()["error"]
        assert c.post("/api/undo", json={"annotator": ""}).status_code == 400
        assert c.post("/api/undo", content=b"[1]").status_code == 400
        # bob's judgement is untouched; alice re-judges the undone pair (no 409)
        assert [(j["annotator"], j["pressed"]) for j in app.store.judgement_rows()] == [("bob", "B")]
        assert c.get("/api/next", params={"annotator": "alice"}).json()["pair"] == first
        r = c.post("/api/judgements", json={"pair_id": first["id"], "annotator": "alice", "choice": "B"})
        assert r.status_code == 201


def test_guidelines_file_is_served_and_a_missing_one_refused(tmp_path):
    (tmp_path / "guide.md").write_text("# Guidelines\n\nPrefer **correct** answers.\n")
    cfg, app = make_app(tmp_path, f"guidelines={tmp_path / 'guide.md'}")
    with BackgroundServer(app.app) as srv:
        info = httpx.get(srv.url + "/api/info").json()
    assert info["guidelines"] == "# Guidelines\n\nPrefer **correct** answers.\n"
    with pytest.raises(ConfigError, match="guidelines: .*nope.md: no such file"):
        load_config(LabelConfig, None, [f"guidelines={tmp_path / 'nope.md'}"])


def test_notes_are_exported_with_the_preference_rows(tmp_path):
    cfg, app = make_app(tmp_path)
    s = app.store
    pid = s.all_pairs()[0]["id"]
    base = {"swapped": False, "rating_a": None, "rating_b": None, "elapsed_ms": 10}
    s.add_judgement(pid, s.annotator_id("alice"), verdict="a", pressed="A", note="clearer", **base)
    s.add_judgement(pid, s.annotator_id("bob"), verdict="a", pressed="A", note=None, **base)
    s.add_judgement(pid, s.annotator_id("cy"), verdict="skip", pressed="skip", note="can't read the code", **base)
    rows, _ = export_rows(s, cfg.export)
    assert rows[0]["notes"] == [{"annotator": "alice", "note": "clearer"},
                                {"annotator": "cy", "note": "can't read the code"}]
    each, _ = export_rows(s, load_config(LabelConfig, None, ["export.policy=each"]).export)
    assert [(r["annotator"], r["notes"]) for r in each] == [
        ("alice", [{"annotator": "alice", "note": "clearer"}]), ("bob", [])]


def test_database_down_answers_503(tmp_path):
    from sqlalchemy.exc import OperationalError

    cfg, app = make_app(tmp_path)

    def down(*a, **k):
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    app.store.next_pair = down
    with BackgroundServer(app.app) as srv:
        r = httpx.get(srv.url + "/api/next", params={"annotator": "alice"})
    assert r.status_code == 503 and r.json() == {"error": "database unavailable, try again in a moment"}


def test_vendored_browser_libraries_ship_as_package_data_with_licences():
    """Every static file (vendored libraries and their licences included) matches a package-data glob,
    and the pages load only local scripts (no network at run time)."""
    import fnmatch
    import re
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["rlhfkit"]
    static = repo / "rlhfkit" / "apps" / "static"
    files = [p.relative_to(repo / "rlhfkit").as_posix() for p in static.rglob("*") if p.is_file()]
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []
    vendor = {p.name for p in (static / "vendor").iterdir()}
    assert {"purify.min.js", "marked.umd.js", "uPlot.iife.min.js", "LICENSE.dompurify", "LICENSE.marked",
            "LICENSE.uplot"} <= vendor
    for page in ("label.html", "view.html"):
        srcs = re.findall(r'(?:src|href)="([^"]+)"', (static / page).read_text())
        assert srcs and all(s.startswith("static/") and (static.parent / s).is_file() for s in srcs), srcs
