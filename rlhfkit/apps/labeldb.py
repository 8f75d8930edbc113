"""Storage of the labelling app: SQLAlchemy Core over SQLite (default) or any database URL.

Schema (``rlhfkit label`` creates it; see docs/commands/label.md)::

    pairs        id PK, key UNIQUE, source, source_row, prompt, completion_a, completion_b,
                 machine_label ('a'|'b'|NULL), gold_label ('a'|'b'|'tie'|'both_bad'|NULL),
                 meta (JSON text), created_at
    annotators   id PK, name UNIQUE, created_at
    judgements   id PK, pair_id FK, annotator_id FK, verdict ('a'|'b'|'tie'|'both_bad'|'skip'),
                 pressed ('A'|'B'|'tie'|'both_bad'|'skip'), swapped (completion_b was shown as A),
                 rating_a, rating_b (1-7 or NULL), note, elapsed_ms, created_at,
                 UNIQUE (pair_id, annotator_id)
    settings     key PK, value

``completion_a``/``completion_b`` are in the source's order (for ``prompt, chosen, rejected`` rows,
a = chosen); what the annotator saw is recovered with ``swapped``. Every judgement is its own
committed transaction; the unique constraint makes a repeated submit fail instead of duplicating.

SQLite runs in WAL mode with ``synchronous=FULL`` (a killed server or a power cut loses no committed
judgement) and write transactions open with ``BEGIN IMMEDIATE``, so concurrent writers queue on the
busy timeout instead of failing on a stale read snapshot.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

SCHEMA_VERSION = "1"

metadata = sa.MetaData()

pairs = sa.Table(
    "pairs", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key", sa.String(128), nullable=False, unique=True),
    sa.Column("source", sa.String(256), nullable=False),
    sa.Column("source_row", sa.Integer),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("completion_a", sa.Text, nullable=False),
    sa.Column("completion_b", sa.Text, nullable=False),
    sa.Column("machine_label", sa.String(8)),
    sa.Column("gold_label", sa.String(16)),
    sa.Column("meta", sa.Text, nullable=False, default="{}"),
    sa.Column("created_at", sa.Float, nullable=False),
)

annotators = sa.Table(
    "annotators", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

judgements = sa.Table(
    "judgements", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("pair_id", sa.Integer, sa.ForeignKey("pairs.id"), nullable=False),
    sa.Column("annotator_id", sa.Integer, sa.ForeignKey("annotators.id"), nullable=False),
    sa.Column("verdict", sa.String(16), nullable=False),
    sa.Column("pressed", sa.String(16), nullable=False),
    sa.Column("swapped", sa.Boolean, nullable=False),
    sa.Column("rating_a", sa.Integer),
    sa.Column("rating_b", sa.Integer),
    sa.Column("note", sa.Text),
    sa.Column("elapsed_ms", sa.Integer),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("pair_id", "annotator_id", name="one_judgement_per_annotator"),
)

settings = sa.Table(
    "settings", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


class AlreadyJudged(Exception):
    """This annotator already judged this pair."""


class UnknownPair(Exception):
    """No pair with this id."""


def database_url(db: str) -> str:
    """A path (``labels.sqlite``) becomes ``sqlite:///<absolute path>``; a URL is kept."""
    if "://" in db:
        return db
    path = Path(db).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" hook below opens transactions
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_on_begin(conn) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")


class LabelStore:
    """All reads and writes of the labelling app. Thread-safe (one connection per call)."""

    def __init__(self, db: str):
        self.url = database_url(db)
        kwargs: dict[str, Any] = {}
        if self.url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if ":memory:" in self.url or self.url in ("sqlite://", "sqlite:///"):
                kwargs["poolclass"] = sa.pool.StaticPool
        else:
            kwargs["pool_pre_ping"] = True  # a database server restart: stale pooled connections are replaced
        self.engine = sa.create_engine(self.url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        metadata.create_all(self.engine)
        with self.tx(write=True) as c:
            if c.execute(sa.select(settings.c.value).where(settings.c.key == "schema_version")).first() is None:
                c.execute(settings.insert().values(key="schema_version", value=SCHEMA_VERSION))

    @contextmanager
    def tx(self, write: bool = False) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            if write:
                conn = conn.execution_options(write=True)
            with conn.begin():
                yield conn

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------- pairs

    def add_pairs(self, rows: list[dict]) -> int:
        """Insert pairs whose ``key`` is new (loading the same source twice adds nothing)."""
        if not rows:
            return 0
        now = time.time()
        with self.tx(write=True) as c:
            have = set(c.execute(sa.select(pairs.c.key)).scalars())
            new = []
            for r in rows:
                if r["key"] in have:
                    continue
                have.add(r["key"])
                new.append({
                    "key": r["key"], "source": r["source"], "source_row": r.get("source_row"),
                    "prompt": r["prompt"], "completion_a": r["completion_a"], "completion_b": r["completion_b"],
                    "machine_label": r.get("machine_label"), "gold_label": r.get("gold_label"),
                    "meta": json.dumps(r.get("meta") or {}, ensure_ascii=False), "created_at": now,
                })
            if new:
                c.execute(pairs.insert(), new)
        return len(new)

    def count_pairs(self, source: Optional[str] = None) -> int:
        q = sa.select(sa.func.count()).select_from(pairs)
        if source is not None:
            q = q.where(pairs.c.source == source)
        with self.tx() as c:
            return int(c.execute(q).scalar_one())

    def source_rows(self, source: str) -> set[int]:
        with self.tx() as c:
            return set(c.execute(sa.select(pairs.c.source_row).where(pairs.c.source == source)).scalars())

    def get_pair(self, pair_id: int) -> Optional[dict]:
        with self.tx() as c:
            row = c.execute(sa.select(pairs).where(pairs.c.id == pair_id)).mappings().first()
        return _pair_dict(row) if row else None

    def all_pairs(self) -> list[dict]:
        with self.tx() as c:
            return [_pair_dict(r) for r in c.execute(sa.select(pairs).order_by(pairs.c.id)).mappings()]

    # ---------------------------------------------------------------- annotators

    def annotator_id(self, name: str, create: bool = True) -> Optional[int]:
        """The annotator's id, registering the name on first use."""
        query = sa.select(annotators.c.id).where(annotators.c.name == name)
        try:
            with self.tx(write=create) as c:
                found = c.execute(query).scalar()
                if found is not None or not create:
                    return found
                return c.execute(annotators.insert().values(name=name, created_at=time.time())).inserted_primary_key[0]
        except IntegrityError:  # registered by a concurrent request (databases without BEGIN IMMEDIATE)
            with self.tx() as c:
                return c.execute(query).scalar_one()

    def annotator_names(self) -> list[str]:
        with self.tx() as c:
            return list(c.execute(sa.select(annotators.c.name).order_by(annotators.c.id)).scalars())

    # ---------------------------------------------------------------- judging

    def _open_pairs(self, annotator_id: int, per_pair: int):
        """Pairs this annotator has not judged and that still need judgements (gold: always)."""
        mine = sa.select(judgements.c.id).where(
            judgements.c.pair_id == pairs.c.id, judgements.c.annotator_id == annotator_id)
        cond = [~sa.exists(mine)]
        if per_pair > 0:
            n_judged = (sa.select(sa.func.count()).select_from(judgements)
                        .where(judgements.c.pair_id == pairs.c.id).scalar_subquery())
            cond.append(sa.or_(pairs.c.gold_label.is_not(None), n_judged < per_pair))
        return sa.and_(*cond)

    def next_pair(self, annotator_id: int, per_pair: int = 0) -> Optional[dict]:
        """The first open pair in load order (so every annotator resumes where they left off)."""
        q = sa.select(pairs).where(self._open_pairs(annotator_id, per_pair)).order_by(pairs.c.id).limit(1)
        with self.tx() as c:
            row = c.execute(q).mappings().first()
        return _pair_dict(row) if row else None

    def progress(self, annotator_id: int, per_pair: int = 0) -> dict:
        with self.tx() as c:
            done = c.execute(sa.select(sa.func.count()).select_from(judgements)
                             .where(judgements.c.annotator_id == annotator_id)).scalar_one()
            remaining = c.execute(sa.select(sa.func.count()).select_from(pairs)
                                  .where(self._open_pairs(annotator_id, per_pair))).scalar_one()
        return {"done": int(done), "remaining": int(remaining), "total": int(done + remaining)}

    def add_judgement(self, pair_id: int, annotator_id: int, **values: Any) -> int:
        """Commit one judgement; raise UnknownPair or AlreadyJudged (nothing is written then)."""
        try:
            with self.tx(write=True) as c:
                if c.execute(sa.select(pairs.c.id).where(pairs.c.id == pair_id)).first() is None:
                    raise UnknownPair(pair_id)
                res = c.execute(judgements.insert().values(
                    pair_id=pair_id, annotator_id=annotator_id, created_at=time.time(), **values))
                return int(res.inserted_primary_key[0])
        except IntegrityError as e:
            raise AlreadyJudged(pair_id) from e

    def undo_last(self, annotator_id: int) -> Optional[dict]:
        """Delete this annotator's most recent judgement (theirs only) and return it, or None when
        they have none left. One write transaction: two undos at once delete two judgements."""
        with self.tx(write=True) as c:
            row = c.execute(sa.select(judgements).where(judgements.c.annotator_id == annotator_id)
                            .order_by(judgements.c.id.desc()).limit(1)).mappings().first()
            if row is None:
                return None
            c.execute(judgements.delete().where(judgements.c.id == row["id"]))
        return dict(row)

    def get_judgement(self, pair_id: int, annotator_id: int) -> Optional[dict]:
        """The stored judgement of this annotator on this pair, or None."""
        q = sa.select(judgements).where(judgements.c.pair_id == pair_id, judgements.c.annotator_id == annotator_id)
        with self.tx() as c:
            row = c.execute(q).mappings().first()
        return dict(row) if row else None

    def judgement_rows(self) -> list[dict]:
        """Every judgement joined with its annotator's name, in commit order."""
        q = (sa.select(judgements, annotators.c.name.label("annotator"))
             .join(annotators, annotators.c.id == judgements.c.annotator_id).order_by(judgements.c.id))
        with self.tx() as c:
            return [dict(r) for r in c.execute(q).mappings()]


def _pair_dict(row) -> dict:
    d = dict(row)
    d["meta"] = json.loads(d.get("meta") or "{}")
    return d
