"""The labelling API never answers 500: property-based bodies to every endpoint, a body-size limit
enforced before a body is read whole, 409 retries that return the stored judgement, side-effect-free
reads."""
from __future__ import annotations

import asyncio
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from starlette.testclient import TestClient

from rlhfkit.apps.label import MAX_BODY_BYTES, LabelConfig, build_app
from rlhfkit.config import load_config

pytestmark = pytest.mark.unit

ENDPOINTS = ["/", "/api/info", "/api/next", "/api/judgements", "/api/stats", "/static/label.js", "/api/nope"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("label")
    rows = [{"prompt": f"prompt {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(LabelConfig, None, [f"db={tmp / 'labels.sqlite'}", f"path={tmp / 'pairs.jsonl'}"])
    return build_app(cfg)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app.app, raise_server_exceptions=False) as c:
        yield c


def _assert_refused_or_ok(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        body = r.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str), r.text[:300]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
FIELDS = {
    "pair_id": st.integers(min_value=-(2**70), max_value=2**70) | json_values,
    "annotator": st.sampled_from(["alice", "bob", "", " ", "a" * 70, "\ud800x"]) | json_values,
    "choice": st.sampled_from(["A", "B", "tie", "both_bad", "skip", "C"]) | json_values,
    "rating_A": st.integers(min_value=-3, max_value=10) | json_values,
    "rating_B": st.integers(min_value=-3, max_value=10) | json_values,
    "note": st.text(max_size=20) | st.sampled_from(["\ud800", "x" * 10001]) | json_values,
    "elapsed_ms": st.sampled_from([0, 1.5, 1e300, float("nan"), float("inf"), -1, 2**64]) | json_values,
}
judgement_bodies = st.fixed_dictionaries({}, optional=FIELDS)
SLOW = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SLOW
@given(value=json_values | judgement_bodies)
def test_any_json_value_to_any_endpoint_is_never_a_500(client, value):
    raw = json.dumps(value, allow_nan=True).encode()
    for path in ENDPOINTS:
        _assert_refused_or_ok(client.post(path, content=raw, headers={"content-type": "application/json"}))


@SLOW
@given(body=judgement_bodies)
def test_judgement_fields_are_validated_not_crashed_on(client, app, body):
    raw = json.dumps(body, allow_nan=True).encode()
    r = client.post("/api/judgements", content=raw, headers={"content-type": "application/json"})
    _assert_refused_or_ok(r)
    if r.status_code in (201, 409):  # accepted: every field was valid; nothing not finite was stored
        e = body.get("elapsed_ms")
        assert e is None or (isinstance(e, (int, float)) and math.isfinite(e))


@SLOW
@given(raw=st.binary(max_size=300))
def test_any_bytes_to_any_endpoint_is_never_a_500(client, raw):
    for path in ENDPOINTS:
        _assert_refused_or_ok(client.post(path, content=raw))
        _assert_refused_or_ok(client.put(path, content=raw))


@SLOW
@given(name=st.text(max_size=80))
def test_get_next_with_any_annotator_is_never_a_500_and_registers_nobody(client, app, name):
    before = app.store.annotator_names()
    r = client.get("/api/next", params={"annotator": name})
    _assert_refused_or_ok(r)
    assert app.store.annotator_names() == before


@pytest.mark.parametrize("text, field", [
    (b'{"pair_id": 1, "annotator": "zed", "choice": "A", "elapsed_ms": NaN}', "NaN is not a JSON number"),
    (b'{"pair_id": 1, "annotator": "zed", "choice": "A", "elapsed_ms": Infinity}', "Infinity is not a JSON number"),
    (b'{"pair_id": 9223372036854775808, "annotator": "zed", "choice": "A"}', "pair_id"),
    (b'{"pair_id": 1' + b"0" * 5000 + b', "annotator": "zed", "choice": "A"}', "body must be a JSON object"),
    (b"[" * 100000 + b"]" * 100000, "413"),
    (b'{"pair_id": 1, "annotator": "zed", "choice": "A", "note": "\\ud800"}', "note"),
], ids=["nan", "infinity", "pair_id_2_63", "int_5000_digits", "nested_200k", "lone_surrogate"])
def test_issue_cases_answer_4xx(client, app, text, field):
    r = client.post("/api/judgements", content=text, headers={"content-type": "application/json"})
    if field == "413":
        assert r.status_code == 413 and "over the limit" in r.json()["error"]
        return
    assert r.status_code == 400 and field in r.json()["error"], r.text
    assert "zed" not in app.store.annotator_names()  # nothing refused was written


def test_retry_answered_409_returns_the_stored_judgement(client, app):
    pid = client.get("/api/next", params={"annotator": "carol"}).json()["pair"]["id"]
    first = {"pair_id": pid, "annotator": "carol", "choice": "A", "rating_A": 6, "rating_B": 3, "note": "clear",
             "elapsed_ms": 1234}
    r1 = client.post("/api/judgements", json=first)
    assert r1.status_code == 201
    r2 = client.post("/api/judgements", json={**first, "choice": "B", "rating_A": 1})  # a retry, or a change of mind
    assert r2.status_code == 409
    got = r2.json()
    assert "already judged" in got["error"]
    stored = got["judgement"]
    assert stored["judgement_id"] == r1.json()["judgement_id"] and stored["pair_id"] == pid
    assert (stored["choice"], stored["rating_A"], stored["rating_B"], stored["note"], stored["elapsed_ms"]) == \
        ("A", 6, 3, "clear", 1234)  # as carol gave it, in the sides she saw
    assert got["pair"]["id"] != pid  # and what carol should judge next


def _asgi_post(app, headers: list[tuple[bytes, bytes]], chunks: int, chunk_size: int = 16 * 1024):
    """POST /api/judgements straight to the ASGI app; returns (status, chunks the app pulled)."""
    pulled = 0
    sent: dict = {}

    async def receive():
        nonlocal pulled
        pulled += 1
        more = pulled < chunks
        return {"type": "http.request", "body": b"x" * chunk_size, "more_body": more}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/judgements", "raw_path": b"/api/judgements", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    return sent["status"], pulled


def test_oversized_body_is_413_without_being_read_whole(app):
    huge = 200 * 1024 * 1024  # 200 MiB in 16 KiB chunks: 12,800 chunks
    # declared too long: refused before one byte is read
    status, pulled = _asgi_post(app.app, [(b"content-length", str(huge).encode())], huge // (16 * 1024))
    assert (status, pulled) == (413, 0)
    # chunked (no Content-Length): refused once the limit is passed, after 64 KiB / 16 KiB + 1 = 5 chunks
    status, pulled = _asgi_post(app.app, [(b"transfer-encoding", b"chunked")], huge // (16 * 1024))
    assert status == 413 and pulled == MAX_BODY_BYTES // (16 * 1024) + 1 == 5


def test_reads_have_no_side_effects(client, app):
    names = app.store.annotator_names()
    rows = len(app.store.judgement_rows())
    for _ in range(2):
        assert client.get("/api/next", params={"annotator": "dave"}).status_code == 200
        assert client.get("/api/info").status_code == 200
        assert client.get("/api/stats").status_code == 200
    assert app.store.annotator_names() == names and "dave" not in names
    assert len(app.store.judgement_rows()) == rows
