"""The run viewer: run discovery, incremental metrics, evaluation files, its HTTP API on loopback."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from rlhfkit.apps.common import BackgroundServer
from rlhfkit.apps.view import ViewApp, discover_runs, read_metrics, read_samples, run_status
from rlhfkit.config import UserError

pytestmark = pytest.mark.unit

# the smallest valid PNG (1x1, transparent)
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6300010000000500010d0a2db40000000049454e44ae426082")


def make_train_run(d: Path, steps: int = 3, finished: bool = False) -> Path:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("train:\n  lr: 1.0e-05\n")
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "reward/mean": 0.1 * s, "kl": 0.01 * s, "loss": 2.0 - 0.1 * s}) + "\n")
    if finished:
        (d / "summary.json").write_text(json.dumps({"command": "ppo", "steps": steps, "tokens_per_second": 812.5}))
    return d


def make_eval_run(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "report.md").write_text("# Evaluation\n\nmean reward 0.2 -> 0.6\n")
    (d / "metrics.json").write_text(json.dumps({"reward": {"before": 0.2, "after": 0.6}, "n": 2}))
    rows = [
        {"prompt": "p1", "completions": {"before": "rude", "after": "kind"}, "rewards": {"before": 0.1, "after": 0.9},
         "gain": 0.8},
        {"prompt": "p2", "completions": {"before": "ok", "after": "worse"}, "rewards": {"before": 0.3, "after": 0.2}},
    ]
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "reward_hist.png").write_bytes(PNG)
    return d


def test_discover_runs(tmp_path):
    a = make_train_run(tmp_path / "runs" / "ppo")
    b = make_eval_run(tmp_path / "runs" / "eval")
    (tmp_path / "runs" / "notes").mkdir()
    runs = discover_runs([str(tmp_path / "runs")])  # a folder of runs: its run sub-folders, sorted
    assert [(r.id, r.name, r.path) for r in runs] == [(0, "eval", b), (1, "ppo", a)]
    assert [r.name for r in discover_runs([str(a), str(b)])] == ["ppo", "eval"]
    with pytest.raises(UserError, match="no such run folder"):
        discover_runs([str(tmp_path / "missing")])
    with pytest.raises(UserError, match="no run files"):
        discover_runs([str(tmp_path / "runs" / "notes")])


def test_read_metrics_incrementally(tmp_path):
    run = make_train_run(tmp_path / "r", steps=2)
    m = run / "metrics.jsonl"
    first = read_metrics(m, 0)
    assert [r["step"] for r in first["rows"]] == [1, 2] and first["offset"] == m.stat().st_size
    with open(m, "a") as f:  # one full line, then a half-written one
        f.write(json.dumps({"step": 3, "kl": 0.5}) + "\n" + '{"step": 4, "kl"')
    second = read_metrics(m, first["offset"])
    assert second["rows"] == [{"step": 3, "kl": 0.5}] and not second["reset"]
    with open(m, "a") as f:
        f.write(': NaN}\nnot json\n')
    third = read_metrics(m, second["offset"])
    assert [r["step"] for r in third["rows"]] == [4] and third["bad_lines"] == 1
    assert third["offset"] == m.stat().st_size
    m.write_text(json.dumps({"step": 1, "kl": 9.0}) + "\n")  # restarted run: file shrank
    fourth = read_metrics(m, third["offset"])
    assert fourth["reset"] and fourth["rows"] == [{"step": 1, "kl": 9.0}]


def test_samples_gain_and_status(tmp_path):
    ev = make_eval_run(tmp_path / "ev")
    rows = read_samples(ev / "samples.jsonl")
    assert rows[0]["gain"] == 0.8  # given
    assert rows[1]["gain"] == pytest.approx(-0.1)  # computed: after - before
    run = make_train_run(tmp_path / "r")
    assert run_status(discover_runs([str(run)])[0]) == "running"
    os.utime(run / "metrics.jsonl", (time.time() - 3600, time.time() - 3600))
    assert run_status(discover_runs([str(run)])[0]) == "stopped"
    (run / "summary.json").write_text("{}")
    assert run_status(discover_runs([str(run)])[0]) == "finished"
    assert run_status(discover_runs([str(ev)])[0]) == "finished"


def test_view_api_live_run_and_eval(tmp_path):
    live = make_train_run(tmp_path / "live", steps=2)
    done = make_train_run(tmp_path / "done", steps=3, finished=True)
    ev = make_eval_run(tmp_path / "ev")
    app = ViewApp(discover_runs([str(live), str(done), str(ev)]))
    with BackgroundServer(app.app) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        runs = c.get("/api/runs").json()["runs"]
        assert [(r["name"], r["status"]) for r in runs] == [("live", "running"), ("done", "finished"), ("ev", "finished")]
        assert runs[1]["summary"]["tokens_per_second"] == 812.5 and "lr" in runs[1]["config"]
        assert runs[2]["images"] == ["reward_hist.png"] and runs[2]["eval_metrics"]["reward"]["after"] == 0.6
        m = c.get("/api/runs/0/metrics").json()
        assert [r["step"] for r in m["rows"]] == [1, 2] and m["status"] == "running"
        with open(live / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 3, "reward/mean": float("nan"), "kl": 0.2}) + "\n")
        m2 = c.get("/api/runs/0/metrics", params={"offset": m["offset"]}).json()
        assert m2["rows"] == [{"step": 3, "reward/mean": None, "kl": 0.2}]  # NaN travels as null
        (live / "summary.json").write_text(json.dumps({"steps": 3}))
        assert c.get("/api/runs/0/metrics", params={"offset": m2["offset"]}).json() == \
            {"rows": [], "offset": m2["offset"], "reset": False, "bad_lines": 0, "status": "finished"}
        s = c.get("/api/runs/2/samples", params={"offset": 1, "limit": 5}).json()
        assert s["total"] == 2 and [r["prompt"] for r in s["rows"]] == ["p2"]
        assert "0.2 -> 0.6" in c.get("/api/runs/2/report").json()["text"]
        img = c.get("/api/runs/2/images/reward_hist.png")
        assert img.status_code == 200 and img.content == PNG and img.headers["content-type"] == "image/png"
        for path, status in [("/api/runs/2/images/..%2Fdone%2Fsummary.json", 404), ("/api/runs/9/metrics", 404),
                             ("/api/runs/0/report", 404), ("/api/runs/0/metrics?offset=-1", 400)]:
            r = c.get(path)
            assert r.status_code == status and "error" in r.json(), path
        assert "static/view.js" in c.get("/").text


def test_view_token(tmp_path):
    run = make_train_run(tmp_path / "r", finished=True)
    app = ViewApp(discover_runs([str(run)]), token="tok-123")
    with BackgroundServer(app.app) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        assert c.get("/api/runs").status_code == 403
        assert c.get("/api/runs/0/metrics", params={"token": "bad"}).json()["error"].startswith("missing or wrong")
        assert c.get("/api/runs", params={"token": "tok-123"}).status_code == 200
        assert c.get("/api/runs/0/metrics", headers={"X-Rlhfkit-Token": "tok-123"}).status_code == 200


def test_view_cli_errors(tmp_path, capsys):
    from rlhfkit.cli import main as cli

    assert cli(["view"]) == 2
    assert "give at least one RUN_DIR" in capsys.readouterr().err
    assert cli(["view", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert cli(["view", str(tmp_path), "--port", "x"]) == 2
    assert "'port' expects int, got 'x'" in capsys.readouterr().err
    assert cli(["view", "--help"]) == 0


def test_new_run_folders_are_picked_up_and_configs_flattened(tmp_path):
    from rlhfkit.apps.view import flat_config

    assert flat_config("model: {name_or_path: x}\ntrain:\n  lr: 1.0e-05\n  betas: [0.9, 0.99]\nrewards: []\n") == {
        "model.name_or_path": "x", "train.lr": 1e-05, "train.betas": [0.9, 0.99], "rewards": []}
    assert flat_config("- a\n") is None and flat_config(": bad: [") is None and flat_config(None) is None
    make_train_run(tmp_path / "runs" / "a", finished=True)
    app = ViewApp(discover_runs([str(tmp_path / "runs")]), roots=[str(tmp_path / "runs")])
    with BackgroundServer(app.app) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        assert [r["name"] for r in c.get("/api/runs").json()["runs"]] == ["a"]
        make_train_run(tmp_path / "runs" / "b")
        (tmp_path / "runs" / "notes").mkdir()  # no run files: not a run
        runs = c.get("/api/runs").json()["runs"]
        assert [(r["id"], r["name"]) for r in runs] == [(0, "a"), (1, "b")]
        assert runs[1]["config_values"] == {"train.lr": 1e-05}
        assert len(c.get("/api/runs/1/metrics").json()["rows"]) == 3
        assert len(c.get("/api/runs").json()["runs"]) == 2  # found once
