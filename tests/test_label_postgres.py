"""The labelling app's documented PostgreSQL path (``db: postgresql+psycopg://...``) against a real server.

A throw-away cluster is created with Debian's ``postgresql`` binaries (``initdb`` / ``pg_ctl``, run as
the ``postgres`` user when the tests run as root) on 127.0.0.1 and a free port. 50 annotators submit
2,000 judgements at once through the HTTP API while the database is killed (``pg_ctl stop -m
immediate``: no clean shutdown, recovery from the WAL) and started again; nothing may be lost or
duplicated. Skipped, with the reason, where no server can be started (scripts/ci_postgres_deps.sh
installs it; the ``psycopg`` driver comes with the ``test`` extra).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres

N_ANNOTATORS, N_PAIRS = 50, 40  # 2,000 judgements


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class PostgresServer:
    """initdb + pg_ctl in a temporary folder; ``url`` is the SQLAlchemy URL of its ``postgres`` database."""

    def __init__(self):
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql")
        self.as_user: list[str] = []
        self.dir = Path(tempfile.mkdtemp(prefix="rlhfkit-pg-"))
        if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to run the server") from None
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.data = self.dir / "data"
        self.url = f"postgresql+psycopg://rlhfkit@127.0.0.1:{self.port}/postgres"
        self._run([self.initdb, "-D", str(self.data), "-U", "rlhfkit", "-A", "trust", "--no-instructions"])

    def _run(self, cmd: list[str]) -> None:
        r = subprocess.run(self.as_user + cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed: {(r.stderr or r.stdout).strip()[-400:]}")

    def start(self) -> None:
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=100"
        self._run([self.pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start"])

    def kill(self) -> None:
        """Stop without a clean shutdown (as a crash): committed transactions must come back from the WAL."""
        self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    def close(self) -> None:
        subprocess.run(self.as_user + [self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (pip install -e '.[test]')")
    try:
        server = PostgresServer()
        server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"no PostgreSQL server could be started: {e}")
    yield server
    server.close()


def test_50_annotators_2000_judgements_survive_a_database_crash(tmp_path: Path, postgres):
    import httpx

    from rlhfkit.apps.common import BackgroundServer
    from rlhfkit.apps.label import LabelConfig, build_app, export
    from rlhfkit.config import load_config

    rows = [{"prompt": f"prompt {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(N_PAIRS)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(LabelConfig, None, [f"db={postgres.url}", f"path={tmp_path / 'pairs.jsonl'}",
                                          f"export.output={tmp_path / 'prefs.jsonl'}", "export.policy=each"])
    app = build_app(cfg)
    assert app.store.engine.dialect.name == "postgresql" and app.store.count_pairs() == N_PAIRS

    committed: dict[str, set[int]] = {}
    statuses: Counter = Counter()
    lock = threading.Lock()
    progress = threading.Event()  # set once a third of the judgements are in
    failures: list[str] = []

    def annotator(k: int, base: str) -> None:
        name = f"annotator{k:02d}"
        mine: set[int] = set()
        with httpx.Client(base_url=base, timeout=60) as c:
            def call(method, path, **kw):
                for _ in range(400):  # retry through the outage (about 25 ms to 1 s apart)
                    try:
                        r = c.request(method, path, **kw)
                    except httpx.TransportError:
                        with lock:
                            statuses["transport"] += 1
                        time.sleep(0.05)
                        continue
                    with lock:
                        statuses[r.status_code] += 1
                    if r.status_code < 500:
                        return r
                    time.sleep(0.05)
                raise RuntimeError(f"{name}: {method} {path} kept failing")

            pair = call("GET", "/api/next", params={"annotator": name}).json()["pair"]
            while pair is not None:
                choice = "A" if (pair["id"] + k) % 3 else "B"
                r = call("POST", "/api/judgements", json={"pair_id": pair["id"], "annotator": name, "choice": choice})
                if r.status_code not in (201, 409):  # 409: committed before the connection dropped
                    raise RuntimeError(f"{name}: {r.status_code} {r.text}")
                mine.add(pair["id"])
                with lock:
                    committed[name] = mine
                    if sum(map(len, committed.values())) >= N_ANNOTATORS * N_PAIRS // 3:
                        progress.set()
                pair = r.json()["pair"] if r.status_code == 201 else call(
                    "GET", "/api/next", params={"annotator": name}).json()["pair"]

    def guarded(k: int, base: str) -> None:
        try:
            annotator(k, base)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            failures.append(repr(e))

    t0 = time.monotonic()
    with BackgroundServer(app.app, timeout=30) as srv:
        threads = [threading.Thread(target=guarded, args=(k, srv.url)) for k in range(N_ANNOTATORS)]
        for t in threads:
            t.start()
        assert progress.wait(300), f"no progress: {statuses}"
        postgres.kill()  # mid-run: requests now fail (503) and the clients retry
        time.sleep(1.0)
        postgres.start()
        for t in threads:
            t.join(600)
    elapsed = time.monotonic() - t0
    assert failures == []
    assert statuses[503] + statuses["transport"] > 0, f"the crash was not seen by any request: {statuses}"
    assert set(statuses) <= {200, 201, 409, 503, "transport"}, statuses  # never a 500

    judged = app.store.judgement_rows()
    keys = [(j["annotator"], j["pair_id"]) for j in judged]
    assert len(judged) == N_ANNOTATORS * N_PAIRS == 2000  # nothing lost
    assert len(set(keys)) == len(keys)  # nothing duplicated
    pair_ids = {p["id"] for p in app.store.all_pairs()}
    assert all(committed[f"annotator{k:02d}"] == pair_ids for k in range(N_ANNOTATORS))
    # every vote is the one its client sent
    assert all(j["pressed"] == ("A" if (j["pair_id"] + int(j["annotator"][9:])) % 3 else "B") for j in judged)
    report = export(cfg)
    assert report["rows"] == 2000  # policy=each: one row per a/b judgement
    print(f"\n2,000 judgements by 50 annotators with a database crash in {elapsed:.1f} s; responses {dict(statuses)}")
    app.store.close()
