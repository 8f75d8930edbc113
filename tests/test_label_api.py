"""The labelling app's HTTP API against a real uvicorn server on loopback, its sources and export."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import httpx
import pytest

from rlhfkit.apps.common import BackgroundServer, resolve_token
from rlhfkit.apps.label import (
    ExportConfig, LabelConfig, build_app, export, export_rows, load_pairs, quality_report, report_path,
)
from rlhfkit.apps.labeldb import LabelStore
from rlhfkit.config import UserError, load_config
from rlhfkit.utils import read_jsonl

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_file(tmp_path: Path, n: int = 3, **extra) -> Path:
    rows = [{"prompt": f"prompt {i}", "chosen": f"good {i}", "rejected": f"bad {i}", **extra} for i in range(n)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def make_cfg(tmp_path: Path, *overrides: str) -> LabelConfig:
    return load_config(LabelConfig, None, [f"db={tmp_path / 'labels.sqlite'}",
                                           f"export.output={tmp_path / 'prefs.jsonl'}", *overrides])


@pytest.fixture
def server(tmp_path):
    cfg = make_cfg(tmp_path, f"path={pairs_file(tmp_path)}")
    app = build_app(cfg)
    with BackgroundServer(app.app) as srv, httpx.Client(base_url=srv.url, timeout=10) as client:
        yield app, client


def submit(client, pair_id, annotator, choice, **kw):
    return client.post("/api/judgements", json={"pair_id": pair_id, "annotator": annotator, "choice": choice, **kw})


def test_label_flow_maps_shown_sides_to_source_order_and_resumes(server):
    app, client = server
    r = client.get("/api/next", params={"annotator": "alice"})
    assert r.status_code == 200
    body = r.json()
    assert body["progress"] == {"done": 0, "remaining": 3, "total": 3}
    pair = body["pair"]
    assert pair["prompt"] == "prompt 0" and {pair["A"], pair["B"]} == {"good 0", "bad 0"}
    # alice prefers the text shown as A and rates A 6, B 2
    r = submit(client, pair["id"], "alice", "A", rating_A=6, rating_B=2, note=" short ", elapsed_ms=1500)
    assert r.status_code == 201
    nxt = r.json()
    assert nxt["progress"] == {"done": 1, "remaining": 2, "total": 3}
    assert nxt["pair"]["prompt"] == "prompt 1"
    (j,) = app.store.judgement_rows()
    picked_good = pair["A"] == "good 0"
    assert j["verdict"] == ("a" if picked_good else "b")  # a = chosen column in source order
    assert j["swapped"] == (not picked_good)
    assert (j["rating_a"], j["rating_b"]) == ((6, 2) if picked_good else (2, 6))
    assert j["note"] == "short" and j["elapsed_ms"] == 1500 and j["pressed"] == "A"
    # a new session (page reload) resumes at the first pair alice has not judged, in the same order
    again = client.get("/api/next", params={"annotator": "alice"}).json()["pair"]
    assert again == nxt["pair"]
    # bob starts at the beginning
    assert client.get("/api/next", params={"annotator": "bob"}).json()["pair"]["id"] == pair["id"]
    assert client.get("/api/info").json()["annotators"] == ["alice"]  # asking registers nobody; judging does


def test_order_is_randomised_per_pair_and_annotator(tmp_path):
    cfg = make_cfg(tmp_path, f"path={pairs_file(tmp_path, n=40)}")
    app = build_app(cfg)
    seen = []
    for pid in range(1, 41):
        seen.append(app._next_for("alice")["pair"]["A"].startswith("bad"))
        app.store.add_judgement(pid, app.store.annotator_id("alice"), verdict="skip", pressed="skip", swapped=False)
    # a fair coin over 40 pairs: P(fewer than 8 or more than 32 swaps) < 1e-4
    assert 8 <= sum(seen) <= 32


def test_refusals_answer_json_4xx(server):
    app, client = server
    pid = client.get("/api/next", params={"annotator": "alice"}).json()["pair"]["id"]
    assert submit(client, pid, "alice", "B").status_code == 201
    r = submit(client, pid, "alice", "A")  # double submit
    assert r.status_code == 409 and "already judged" in r.json()["error"]
    r = submit(client, 9999, "alice", "A")
    assert r.status_code == 404 and r.json() == {"error": "unknown pair id 9999"}
    for bad, field in [
        ({"pair_id": pid, "annotator": "alice", "choice": "C"}, "choice"),
        ({"pair_id": "1", "annotator": "alice", "choice": "A"}, "pair_id"),
        ({"pair_id": pid, "annotator": "", "choice": "A"}, "annotator"),
        ({"pair_id": pid, "annotator": "bob", "choice": "A", "rating_A": 8}, "rating_A"),
        ({"pair_id": pid, "annotator": "bob", "choice": "A", "elapsed_ms": -1}, "elapsed_ms"),
    ]:
        r = client.post("/api/judgements", json=bad)
        assert r.status_code == 400 and r.json()["error"].startswith(field), (bad, r.text)
    r = client.post("/api/judgements", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = client.get("/api/nope")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = client.get("/api/judgements")
    assert r.status_code == 405 and "error" in r.json()
    assert len(app.store.judgement_rows()) == 1  # nothing refused was written


def test_token_required_off_loopback(tmp_path):
    assert resolve_token("127.0.0.1", None) is None and resolve_token("localhost", None) is None
    t1, t2 = resolve_token("0.0.0.0", None), resolve_token("192.168.1.5", None)
    assert len(t1) >= 30 and t1 != t2  # secrets.token_urlsafe(24): 32 characters, fresh each time
    assert resolve_token("127.0.0.1", "fixed") == "fixed"
    cfg = make_cfg(tmp_path, f"path={pairs_file(tmp_path)}")
    app = build_app(cfg, token="s3cret-token")
    with BackgroundServer(app.app) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        for path in ("/api/info", "/api/next?annotator=alice", "/api/stats"):
            r = c.get(path)
            assert r.status_code == 403 and "token" in r.json()["error"]
            assert c.get(path, headers={"X-Rlhfkit-Token": "wrong"}).status_code == 403
        r = c.post("/api/judgements", json={"pair_id": 1, "annotator": "alice", "choice": "A"},
                   params={"token": "nope"})
        assert r.status_code == 403
        assert c.get("/api/next", params={"annotator": "alice", "token": "s3cret-token"}).status_code == 200
        r = c.post("/api/judgements", json={"pair_id": 1, "annotator": "alice", "choice": "A"},
                   headers={"X-Rlhfkit-Token": "s3cret-token"})
        assert r.status_code == 201
        assert len(app.store.judgement_rows()) == 1


def test_concurrent_annotators_neither_lose_nor_duplicate(tmp_path):
    n = 12
    cfg = make_cfg(tmp_path, f"path={pairs_file(tmp_path, n=n)}")
    app = build_app(cfg)
    statuses: dict[str, list[int]] = {"alice": [], "bob": [], "dup": []}
    with BackgroundServer(app.app) as srv:
        barrier = threading.Barrier(4)

        def annotate(name: str, key: str):
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                barrier.wait(timeout=10)
                for pid in range(1, n + 1):
                    statuses[key].append(submit(c, pid, name, "A" if pid % 2 else "B").status_code)

        threads = [threading.Thread(target=annotate, args=a) for a in
                   [("alice", "alice"), ("bob", "bob"), ("carol", "dup"), ("carol", "dup")]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
    assert statuses["alice"] == [201] * n and statuses["bob"] == [201] * n
    # carol submitted every pair twice at the same time: exactly one of each two was accepted
    assert sorted(statuses["dup"]) == [201] * n + [409] * n
    rows = app.store.judgement_rows()
    assert len(rows) == 3 * n
    assert len({(r["pair_id"], r["annotator"]) for r in rows}) == 3 * n
    assert {name: sum(r["annotator"] == name for r in rows) for name in ("alice", "bob", "carol")} == \
        {"alice": n, "bob": n, "carol": n}


def test_judgements_per_pair_and_gold_pairs(tmp_path):
    rows = [{"prompt": "g", "chosen": "right", "rejected": "wrong", "gold": "chosen"}] + \
        [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "gold": ""} for i in range(2)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = make_cfg(tmp_path, f"path={path}", "columns.gold=gold", "judgements_per_pair=1")
    app = build_app(cfg)
    gold_id = app._next_for("alice")["pair"]["id"]
    assert app.store.get_pair(gold_id)["gold_label"] == "a"
    alice = app.store.annotator_id("alice")
    for pid in (gold_id, gold_id + 1):
        app.store.add_judgement(pid, alice, verdict="a", pressed="A", swapped=False)
    # bob still gets the gold pair (shown to everyone), then skips p0 (already has its 1 judgement)
    assert app._next_for("bob")["pair"]["id"] == gold_id
    bob = app.store.annotator_id("bob")
    app.store.add_judgement(gold_id, bob, verdict="b", pressed="A", swapped=True)
    out = app._next_for("bob")
    assert out["pair"]["prompt"] == "p1" and out["progress"] == {"done": 1, "remaining": 1, "total": 2}
    report = quality_report(app.store)
    assert report["annotators"]["alice"]["gold"] == {"correct": 1, "items": 1, "accuracy": 1.0}
    assert report["annotators"]["bob"]["gold"] == {"correct": 0, "items": 1, "accuracy": 0.0}


def store_with_votes(tmp_path, votes: dict[int, dict[str, str]], n_pairs: int, **pair_extra) -> LabelStore:
    """A database with pairs 1..n ('prompt i', a='A i', b='B i') and the given verdicts."""
    store = LabelStore(str(tmp_path / "votes.sqlite"))
    store.add_pairs([{"key": f"k{i}", "source": "file", "prompt": f"prompt {i}", "completion_a": f"A {i}",
                      "completion_b": f"B {i}", **pair_extra} for i in range(1, n_pairs + 1)])
    for pid, by in votes.items():
        for name, verdict in by.items():
            store.add_judgement(pid, store.annotator_id(name), verdict=verdict, pressed="-", swapped=False,
                                rating_a=5 if verdict == "a" else None)
    return store


VOTES = {
    1: {"ann": "a", "bob": "a", "cy": "b"},        # majority a, not unanimous
    2: {"ann": "b", "bob": "b"},                   # unanimous b
    3: {"ann": "a", "bob": "b"},                   # disagreement
    4: {"ann": "tie", "bob": "tie", "cy": "a"},    # ties win (ties=vote); a alone with ties=abstain
    5: {"ann": "skip", "bob": "skip"},             # no votes
    6: {"ann": "both_bad", "bob": "both_bad", "cy": "b"},
    # pair 7: nobody
}


@pytest.mark.parametrize("policy,ties,min_votes,expected_rows,expected_dropped", [
    ("majority", "vote", 1, [(1, "A 1", 2 / 3), (2, "B 2", 1.0)],
     {"disagreement": 1, "tie": 1, "no_votes": 1, "both_bad": 1, "unlabelled": 1}),
    ("unanimous", "vote", 1, [(2, "B 2", 1.0)],
     {"disagreement": 4, "no_votes": 1, "unlabelled": 1}),  # pairs 1, 3, 4, 6 are split
    ("majority", "abstain", 1, [(1, "A 1", 2 / 3), (2, "B 2", 1.0), (4, "A 4", 1.0)],
     {"disagreement": 1, "no_votes": 1, "both_bad": 1, "unlabelled": 1}),
    ("majority", "abstain", 2, [(1, "A 1", 2 / 3), (2, "B 2", 1.0)],
     {"disagreement": 1, "too_few_votes": 1, "no_votes": 1, "both_bad": 1, "unlabelled": 1}),
])
def test_export_policies(tmp_path, policy, ties, min_votes, expected_rows, expected_dropped):
    store = store_with_votes(tmp_path, VOTES, 7)
    rows, dropped = export_rows(store, ExportConfig(policy=policy, ties=ties, min_votes=min_votes))
    assert [(r["pair_id"], r["chosen"], r["agreement"]) for r in rows] == \
        [(p, c, pytest.approx(a)) for p, c, a in expected_rows]
    for r in rows:
        assert {r["chosen"], r["rejected"]} == {f"A {r['pair_id']}", f"B {r['pair_id']}"}
        assert r["prompt"] == f"prompt {r['pair_id']}"
    assert dropped == {k: v for k, v in expected_dropped.items() if v}
    if rows and rows[0]["pair_id"] == 1:
        assert rows[0]["annotators"] == ["ann", "bob", "cy"] and rows[0]["votes"] == 3
        assert rows[0]["chosen_rating"] == 5 and rows[0]["rejected_rating"] is None


def test_export_each_keeps_every_judgement_and_filters_annotators(tmp_path):
    store = store_with_votes(tmp_path, VOTES, 7)
    rows, dropped = export_rows(store, ExportConfig(policy="each"))
    got = sorted((r["pair_id"], r["annotator"], r["chosen"]) for r in rows)
    assert got == [(1, "ann", "A 1"), (1, "bob", "A 1"), (1, "cy", "B 1"), (2, "ann", "B 2"), (2, "bob", "B 2"),
                   (3, "ann", "A 3"), (3, "bob", "B 3"), (4, "cy", "A 4"), (6, "cy", "B 6")]
    assert dropped == {"judgement_tie": 2, "judgement_both_bad": 2, "no_votes": 1, "unlabelled": 1}
    only_ann, _ = export_rows(store, ExportConfig(policy="majority", annotators=["ann"]))
    assert [(r["pair_id"], r["chosen"]) for r in only_ann] == [(1, "A 1"), (2, "B 2"), (3, "A 3")]


def test_export_writes_dataset_and_report_atomically(tmp_path):
    store = store_with_votes(tmp_path, VOTES, 7)
    cfg = make_cfg(tmp_path, "source=none", f"db={tmp_path / 'votes.sqlite'}")
    report = export(cfg, store)
    rows = read_jsonl(tmp_path / "prefs.jsonl")
    assert [r["chosen"] for r in rows] == ["A 1", "B 2"] and report["rows"] == 2
    saved = json.loads(report_path(tmp_path / "prefs.jsonl").read_text())
    assert saved["dropped"]["disagreement"] == 1
    # ann/bob judged pairs 1,2,3,4,6 (skips removed): ann a b a tie both_bad, bob a b b tie both_bad
    # p_o = 4/5; ann and bob have the same marginals except a/b on pair 3:
    # ann a2 b1 tie1 bb1, bob a1 b2 tie1 bb1 -> p_e = (2 + 2 + 1 + 1)/25 = 6/25 -> kappa = (20-6)/(25-6) = 14/19
    ann_bob = next(p for p in saved["quality"]["agreement"]["pairwise"] if p["annotators"] == ["ann", "bob"])
    assert ann_bob["items"] == 5 and ann_bob["cohen_kappa"] == pytest.approx(14 / 19)
    assert not list(tmp_path.glob(".prefs*.tmp"))


def test_prefs_source_keeps_machine_label_for_audit(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "chosen_score": 0.9, "rejected_score": 0.1,
             "length_score": 0.5} for i in range(4)]
    cfg = make_cfg(tmp_path, "source=prefs", f"path={write_jsonl(tmp_path / 'prefs_out.jsonl', rows)}")
    app = build_app(cfg)
    pairs = app.store.all_pairs()
    assert [p["machine_label"] for p in pairs] == ["a"] * 4
    assert pairs[0]["meta"] == {"chosen_score": 0.9, "rejected_score": 0.1, "length_score": 0.5}
    # humans agree with the machine on pairs 1, 2, 3 and not on 4
    for pid, verdict in zip(range(1, 5), ["a", "a", "a", "b"]):
        app.store.add_judgement(pid, app.store.annotator_id("ann"), verdict=verdict, pressed="-", swapped=False)

    def reward(prompts, completions):  # prefers the rejected texts: agrees only where humans chose b
        return [1.0 if c.startswith("r") else 0.0 for c in completions]

    report = quality_report(app.store, reward)
    assert report["machine"]["majority"] == {"items": 4, "agree": 3, "agreement": 0.75}
    assert report["machine"]["per_annotator"]["ann"]["agreement"] == 0.75
    assert report["reward"] == {"items": 4, "agree": 1, "agreement": 0.25, "mean_margin": -0.5}
    exported, _ = export_rows(app.store, ExportConfig())
    assert [r["machine_agrees"] for r in exported] == [True, True, True, False]


def test_models_source_samples_on_the_fly_through_rlhfkit_generation(tmp_path, monkeypatch):
    calls = {"load": [], "generate": []}

    def load_policy(model_cfg, lora_cfg=None):
        calls["load"].append((model_cfg.name_or_path, lora_cfg.adapter_path if lora_cfg else None))
        return f"model:{model_cfg.name_or_path}", "tok"

    def generate(model, tokenizer, prompts, gen_cfg):
        calls["generate"].append((model, list(prompts), gen_cfg.max_new_tokens))
        return [f"{model} says {p}" for p in prompts]

    monkeypatch.setitem(sys.modules, "rlhfkit.models", types.SimpleNamespace(load_policy=load_policy))
    monkeypatch.setitem(sys.modules, "rlhfkit.generation", types.SimpleNamespace(generate=generate))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}"} for i in range(3)])
    cfg = make_cfg(tmp_path, "source=models", f"path={prompts}", "model.name_or_path=base",
                   "model_b.name_or_path=tuned", "generation.batch_size=2", "generation.max_new_tokens=7")
    app = build_app(cfg)
    assert calls == {"load": [], "generate": []}  # nothing loaded until a pair is needed
    first = app._next_for("ann")
    assert first["progress"] == {"done": 0, "remaining": 3, "total": 3}
    assert calls["load"] == [("base", None), ("tuned", None)]
    assert calls["generate"] == [("model:base", ["q0", "q1"], 7), ("model:tuned", ["q0", "q1"], 7)]
    p = app.store.get_pair(first["pair"]["id"])
    assert (p["prompt"], p["completion_a"], p["completion_b"]) == ("q0", "model:base says q0", "model:tuned says q0")
    assert p["meta"] == {"model_a": "base", "model_b": "tuned"}
    ann = app.store.annotator_id("ann")
    for pid in (1, 2):
        app.store.add_judgement(pid, ann, verdict="b", pressed="-", swapped=False)
    third = app._next_for("ann")  # runs out -> samples the last prompt
    assert third["pair"]["prompt"] == "q2" and len(calls["generate"]) == 4
    app.store.add_judgement(third["pair"]["id"], ann, verdict="a", pressed="-", swapped=False)
    assert app._next_for("ann") == {"annotator": "ann", "pair": None,
                                    "progress": {"done": 3, "remaining": 0, "total": 3}}
    # a restarted server samples nothing again
    again = build_app(cfg)
    assert again.sampler.pending == 0 and again._next_for("bob")["pair"]["prompt"] == "q0"
    assert len(calls["generate"]) == 4


def test_bad_input_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                                 {"prompt": "p", "chosen": "", "rejected": "r"}])
    with pytest.raises(UserError, match=r"bad.jsonl: row 2: field 'chosen' is empty"):
        load_pairs(make_cfg(tmp_path, f"path={path}"))
    path.write_text('{"prompt": "p", "completion_a": "x", "completion_b": "y", "g": "c"}\n')
    with pytest.raises(UserError, match=r"row 1: field 'g' must be a, b, tie"):
        load_pairs(make_cfg(tmp_path, f"path={path}", "columns.gold=g"))
    path.write_text('{"prompt": "p"\n')
    with pytest.raises(UserError, match=r"bad.jsonl: row 1: column 15: malformed JSON"):
        load_pairs(make_cfg(tmp_path, f"path={path}"))


def test_cli_errors_and_export(tmp_path, capsys):
    from rlhfkit.cli import main as cli

    assert cli(["label", "export", "bogus=1"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err
    assert cli(["label", "serve", f"db={tmp_path / 'x.sqlite'}"]) == 2
    assert "source=file needs 'path'" in capsys.readouterr().err
    store_with_votes(tmp_path, VOTES, 7)
    out = tmp_path / "cli_prefs.jsonl"
    assert cli(["label", "export", f"db={tmp_path / 'votes.sqlite'}", f"export.output={out}",
                "export.policy=unanimous"]) == 0
    assert "wrote 1 rows" in capsys.readouterr().out
    assert [r["chosen"] for r in read_jsonl(out)] == ["B 2"]
    assert cli(["label", "--help"]) == 0
    assert "export.policy" in capsys.readouterr().out


def test_killed_server_loses_no_judgement(tmp_path):
    """SIGKILL the real CLI server right after two answered submits: both are in the database."""
    path = pairs_file(tmp_path)
    db = tmp_path / "kill.sqlite"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "label", f"path={path}", f"db={db}", "port=0"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        url, deadline = None, time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            if line.startswith("open http://"):
                url = line.split()[1]
        assert url, "server did not print its URL"
        with httpx.Client(base_url=url, timeout=10) as c:
            first = c.get("api/next", params={"annotator": "ann"}).json()["pair"]["id"]
            second = submit(c, first, "ann", "A").json()["pair"]["id"]
            assert submit(c, second, "ann", "tie").status_code == 201
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    rows = LabelStore(str(db)).judgement_rows()
    assert [(r["pair_id"], r["pressed"]) for r in rows] == [(first, "A"), (second, "tie")]


def test_models_source_with_real_tiny_models(tmp_path, tiny_gpt2):
    """The same path without stubs: a real tiny GPT-2 sampled through rlhfkit.generation.generate."""
    from rlhfkit.config import GenerationConfig, ModelConfig
    from rlhfkit.models import load_policy
    from rlhfkit.generation import generate

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"the cat {i}"} for i in range(2)])
    cfg = make_cfg(tmp_path, "source=models", f"path={prompts}", f"model.name_or_path={tiny_gpt2}",
                   "generation.batch_size=2", "generation.max_new_tokens=5", "generation.do_sample=false")
    app = build_app(cfg)
    first = app._next_for("ann")
    p = app.store.get_pair(first["pair"]["id"])
    model, tok = load_policy(ModelConfig(name_or_path=tiny_gpt2))
    expected = generate(model, tok, ["the cat 0"], GenerationConfig(max_new_tokens=5, do_sample=False))[0]
    # greedy: side A is exactly what the rollout layer produces for the prompt
    assert p["prompt"] == "the cat 0" and p["completion_a"] == expected
