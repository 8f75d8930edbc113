"""``rlhfkit label``: a local web page that collects pairwise human preferences.

::

    rlhfkit label  [--config label.yaml] [key=value ...]     serve the page (default sub-command)
    rlhfkit label export [--config label.yaml] [key=value ...]  write preference rows + report
    rlhfkit label stats  [--config label.yaml] [key=value ...]  print agreement / speed / gold report

Each pair is a prompt and two responses, shown in an order drawn per (pair, annotator) and stored
with the judgement (``swapped``). Keys: ``a``/``<-`` A is better, ``b``/``->`` B is better,
``t`` tie, ``x`` both bad, ``s`` skip, ``n`` note. Judgements go to a database (SQLite in WAL mode
by default, any SQLAlchemy URL otherwise), one committed transaction each, before the next pair is
sent. Pairs come from a file (``source=file``), from ``rlhfkit prefs`` output (``source=prefs``,
keeping the machine's label to measure its agreement with the humans), or are sampled on the fly
from one or two models (``source=models``). ``export`` writes the ``prompt, chosen, rejected`` rows
that ``rlhfkit reward`` and ``rlhfkit dpo`` read; ``docs/commands/label.md`` describes policies and schema.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import random
import re
import sys
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Callable, Optional

from sqlalchemy.exc import OperationalError

from rlhfkit.apps import agreement as agr
from rlhfkit.apps.common import (
    STATIC_DIR, ApiError, SafeJSONResponse, check_token, exception_handlers, resolve_token, serve,
)
from rlhfkit.apps.labeldb import AlreadyJudged, LabelStore, UnknownPair
from rlhfkit.config import (
    ConfigError, GenerationConfig, LoraConfig, ModelConfig, UserError, _check_choice, load_config,
)

SUBCOMMANDS = ("serve", "export", "stats")
MAX_BODY_BYTES = 64 * 1024
"""Largest request body the API reads (a judgement with a 10,000-character note is well under it);
a larger one is answered 413 as soon as its Content-Length, or its streamed size, passes this."""
MAX_ID = 2**63 - 1
"""Largest pair id (SQLite and PostgreSQL integers are 64-bit)."""
COLUMN_KEYS = ("prompt", "completion_a", "completion_b", "id", "gold")
CHOICES = ("A", "B", "tie", "both_bad", "skip")
NAME_RE = re.compile(r"^[\w][\w .@+-]{0,63}$")


@dataclass
class ExportConfig:
    output: str = "labels/preferences.jsonl"
    """Where ``rlhfkit label export`` writes the preference rows (jsonl, written atomically); the
    quality report goes next to it as ``<name>.report.json``."""
    policy: str = "majority"
    """How the judgements of one pair become rows: ``majority`` (one row when more than half of the
    pair's votes agree), ``unanimous`` (one row when all votes agree), ``each`` (one row per
    annotator's a/b judgement, disagreements kept as they are, with an ``annotator`` column)."""
    ties: str = "vote"
    """``vote``: a tie is a vote (a pair whose winning vote is a tie is dropped, and ties dilute a
    majority); ``abstain``: tie judgements are ignored like skips. "Both bad" is always a vote, and a
    pair that both-bad wins is dropped. Skips are never votes."""
    min_votes: int = 1
    """Drop pairs with fewer counted votes than this (e.g. 2 to export only cross-checked pairs)."""
    include_gold: bool = True
    """Also export the gold pairs (their human verdicts, like any other pair)."""
    annotators: list[str] = field(default_factory=list)
    """Only use these annotators' judgements (empty: everyone)."""

    def validate(self) -> None:
        _check_choice("export.policy", self.policy, ["majority", "unanimous", "each"])
        _check_choice("export.ties", self.ties, ["vote", "abstain"])
        if self.min_votes < 1:
            raise ConfigError(f"export.min_votes must be >= 1, got {self.min_votes}")


@dataclass
class LabelConfig:
    db: str = "labels/labels.sqlite"
    """SQLite file (created on first use, WAL mode) or any SQLAlchemy database URL, e.g.
    ``postgresql+psycopg://user@host/labels``."""
    source: str = "file"
    """Where pairs come from: ``file`` (a prompt and two completions per row), ``prefs`` (output of
    ``rlhfkit prefs``; the machine's label is kept to compute its agreement with the humans),
    ``models`` (prompts from ``path``, two completions sampled on the fly), or ``none`` (only pairs
    already in the database)."""
    path: Optional[str] = None
    """The .jsonl / .json / .csv file of pairs (``file``, ``prefs``) or of prompts (``models``)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Map of ``prompt``, ``completion_a``, ``completion_b``, ``id``, ``gold`` to the file's
    column names. Defaults: ``prompt``; ``completion_a``/``completion_b`` when the file has them,
    else ``chosen``/``rejected``; no id (pairs are keyed by their text); no gold."""
    max_pairs: Optional[int] = None
    """Load only the first N rows of ``path``."""
    judgements_per_pair: int = 0
    """Stop showing a pair once this many annotators judged it (0: every annotator judges every
    pair). Gold pairs are shown to everyone regardless."""
    seed: int = 0
    """Seed of the A/B order, which is drawn per (pair, annotator) and stored with each judgement."""
    instructions: str = "Which response is better? Judge helpfulness, correctness and harmlessness."
    """Text shown above every pair."""
    guidelines: Optional[str] = None
    """A markdown file of labelling guidelines, shown (rendered, sanitised) on the sign-in page and
    on the Guidelines panel (key ``g``); read when the server starts."""
    host: str = "127.0.0.1"
    """Address to listen on. Any non-loopback address turns the access token on."""
    port: int = 8765
    """Port to listen on (0: a free port)."""
    token: Optional[str] = None
    """Access token every API call must carry. None: a random one (secrets.token_urlsafe) when
    ``host`` is not a loopback address, none on loopback."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """``source=models``: the policy that writes response A (and B, unless ``model_b``/``lora_b``)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """``source=models``: adapter applied to ``model`` (set ``enabled`` and ``adapter_path``)."""
    model_b: Optional[ModelConfig] = None
    """``source=models``: a second policy for response B; unset, B comes from ``model`` (with
    ``lora_b`` when that is enabled, else as a second sample of the same policy)."""
    lora_b: LoraConfig = field(default_factory=LoraConfig)
    """``source=models``: adapter for side B, e.g. base model vs. the same model + a trained adapter."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """``source=models``: decoding settings; ``generation.batch_size`` prompts are sampled whenever
    an annotator runs out of pairs."""
    reward_function: Optional[str] = None
    """``module:function`` with ``fn(prompts, completions) -> list[float]``; when set, ``stats`` and
    ``export`` report how often this reward agrees with the humans."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Export settings (``rlhfkit label export``)."""

    def validate(self) -> None:
        _check_choice("source", self.source, ["file", "prefs", "models", "none"])
        for key in self.columns:
            if key not in COLUMN_KEYS:
                raise ConfigError(f"columns: unknown key '{key}' (valid: {', '.join(COLUMN_KEYS)})")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.judgements_per_pair < 0:
            raise ConfigError(f"judgements_per_pair must be >= 0, got {self.judgements_per_pair}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ConfigError(f"max_pairs must be >= 1, got {self.max_pairs}")
        if self.guidelines is not None and not Path(self.guidelines).is_file():
            raise ConfigError(f"guidelines: {self.guidelines}: no such file (a markdown file)")


# --------------------------------------------------------------------------------------------
# Sources of pairs
# --------------------------------------------------------------------------------------------


def read_rows(path: str | Path, limit: Optional[int] = None) -> list[dict]:
    """Rows of any file the data layer reads (jsonl / json / csv / parquet / datasets folder)."""
    from rlhfkit.data import read_table

    rows = read_table(str(path)).rows
    return rows[:limit] if limit else rows


def _columns(cfg: LabelConfig, first: dict) -> dict[str, Optional[str]]:
    cols = dict(cfg.columns)
    cols.setdefault("prompt", "prompt")
    if cfg.source == "prefs":
        cols.setdefault("completion_a", "chosen")
        cols.setdefault("completion_b", "rejected")
    else:
        cols.setdefault("completion_a", "completion_a" if "completion_a" in first else "chosen")
        cols.setdefault("completion_b", "completion_b" if "completion_b" in first else "rejected")
    cols.setdefault("id", None)
    cols.setdefault("gold", None)
    return cols


def _text(row: dict, column: str, path: str, i: int) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        what = "missing" if value is None else ("empty" if isinstance(value, str) else f"not text ({value!r:.40})")
        raise UserError(f"{path}: row {i}: field '{column}' is {what}")
    return value


def _gold(value, cols: dict, path: str, i: int) -> Optional[str]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    v = str(value).strip().lower()
    named = {str(cols["completion_a"]).lower(): "a", str(cols["completion_b"]).lower(): "b"}
    v = named.get(v, v)
    if v not in ("a", "b", "tie", "both_bad"):
        raise UserError(f"{path}: row {i}: field '{cols['gold']}' must be a, b, tie, both_bad "
                        f"or a completion column name, got {value!r}")
    return v


def load_pairs(cfg: LabelConfig) -> list[dict]:
    """Pairs from ``cfg.path`` (``file`` or ``prefs``), as rows for ``LabelStore.add_pairs``."""
    path = str(cfg.path)
    rows = read_rows(path, cfg.max_pairs)
    if not rows:
        raise UserError(f"{path}: no rows")
    cols = _columns(cfg, rows[0])
    used = {c for c in cols.values() if c}
    out = []
    for i, row in enumerate(rows, start=1):
        prompt = _text(row, cols["prompt"], path, i)
        a = _text(row, cols["completion_a"], path, i)
        b = _text(row, cols["completion_b"], path, i)
        if cols["id"]:
            if row.get(cols["id"]) in (None, ""):
                raise UserError(f"{path}: row {i}: field '{cols['id']}' is missing")
            key = f"id:{row[cols['id']]}"
        else:
            key = "sha1:" + hashlib.sha1(json.dumps([prompt, a, b]).encode("utf-8")).hexdigest()
        out.append({
            "key": key, "source": cfg.source, "source_row": i, "prompt": prompt,
            "completion_a": a, "completion_b": b,
            "machine_label": "a" if cfg.source == "prefs" else None,
            "gold_label": _gold(row.get(cols["gold"]), cols, path, i) if cols["gold"] else None,
            "meta": {k: v for k, v in row.items() if k not in used},
        })
    return out


class ModelPairSampler:
    """``source=models``: samples pairs for prompts not yet sampled, ``generation.batch_size`` at a
    time, through ``rlhfkit.models.load_policy`` and ``rlhfkit.generation.generate`` (imported on first
    use, so serving pairs from files never loads torch)."""

    def __init__(self, cfg: LabelConfig, store: LabelStore):
        self.cfg, self.store = cfg, store
        path = str(cfg.path)
        rows = read_rows(path, cfg.max_pairs)
        col = cfg.columns.get("prompt", "prompt")
        self.prompts = [(i, _text(r, col, path, i), r) for i, r in enumerate(rows, start=1)]
        self.key_prefix = f"models:{Path(path).resolve()}:"
        self._done = {int(k) for k in store.source_rows("models") if k is not None}
        self.lock = threading.RLock()
        self._policies: Optional[tuple] = None

    @property
    def pending(self) -> int:
        return sum(1 for i, _, _ in self.prompts if i not in self._done)

    def _load(self) -> tuple:
        from rlhfkit.models import load_policy

        cfg = self.cfg
        policy_a = load_policy(cfg.model, cfg.lora if cfg.lora.enabled else None)
        if cfg.model_b is not None or cfg.lora_b.enabled:
            policy_b = load_policy(cfg.model_b or cfg.model, cfg.lora_b if cfg.lora_b.enabled else None)
        else:
            policy_b = policy_a
        return policy_a, policy_b

    def _names(self) -> tuple[str, str]:
        cfg = self.cfg
        a = cfg.model.name_or_path + (f"+{cfg.lora.adapter_path}" if cfg.lora.enabled else "")
        b = (cfg.model_b or cfg.model).name_or_path + (f"+{cfg.lora_b.adapter_path}" if cfg.lora_b.enabled else "")
        return a, b

    def fill(self) -> int:
        """Sample the next batch of prompts; returns the number of new pairs (0 when none left)."""
        from rlhfkit.generation import generate

        with self.lock:
            batch = [p for p in self.prompts if p[0] not in self._done][: self.cfg.generation.batch_size]
            if not batch:
                return 0
            if self._policies is None:
                self._policies = self._load()
            (model_a, tok_a), (model_b, tok_b) = self._policies
            prompts = [p for _, p, _ in batch]
            outs_a = generate(model_a, tok_a, prompts, self.cfg.generation)
            outs_b = generate(model_b, tok_b, prompts, self.cfg.generation)
            if len(outs_a) != len(prompts) or len(outs_b) != len(prompts):
                raise RuntimeError(f"generate returned {len(outs_a)}/{len(outs_b)} completions for {len(prompts)} prompts")
            name_a, name_b = self._names()
            rows = [{
                "key": f"{self.key_prefix}{i}", "source": "models", "source_row": i, "prompt": p,
                "completion_a": a, "completion_b": b,
                "meta": {"model_a": name_a, "model_b": name_b},
            } for (i, p, _), a, b in zip(batch, outs_a, outs_b)]
            added = self.store.add_pairs(rows)
            self._done.update(i for i, _, _ in batch)
            return added


# --------------------------------------------------------------------------------------------
# Web app
# --------------------------------------------------------------------------------------------


def is_swapped(seed: int, pair_id: int, annotator: str) -> bool:
    """Whether completion_b is shown as A for this annotator: a fair coin, fixed per (pair, annotator)."""
    return random.Random(f"{seed}:{pair_id}:{annotator}").random() < 0.5


def _annotator(value) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value.strip()):
        raise ApiError(400, "annotator: give a name of 1-64 letters, digits, spaces or . @ + - _")
    return value.strip()


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def read_json_object(request, limit: int = MAX_BODY_BYTES) -> dict:
    """The request body as a JSON object, read at most ``limit`` bytes far: 413 when the declared
    Content-Length or the streamed (e.g. chunked) size passes ``limit``; 400 for a body that is not
    UTF-8 JSON, holds ``NaN``/``Infinity``, an integer of thousands of digits or deep nesting, or is
    not an object."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise ApiError(400, f"Content-Length: a number of bytes, got {length[:40]!r}")
        if int(length) > limit:
            raise ApiError(413, f"body of {int(length)} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks).decode("utf-8"), parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"body must be a JSON object ({e.msg} at character {e.pos})") from None
    except UnicodeDecodeError:
        raise ApiError(400, "body must be a JSON object in UTF-8") from None
    except ValueError as e:  # NaN / Infinity, or an integer past Python's digit limit
        raise ApiError(400, f"body must be a JSON object: {str(e).splitlines()[0][:120]}") from None
    except RecursionError:
        raise ApiError(400, "body must be a JSON object: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


def _text_field(body: dict, key: str, max_chars: int) -> Optional[str]:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > max_chars:
        raise ApiError(400, f"{key}: text of at most {max_chars} characters, or null")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (\\ud800) that JSON allows and UTF-8 cannot store
        raise ApiError(400, f"{key}: text that is not valid Unicode (a lone surrogate)") from None
    return v


def _rating(body: dict, key: str) -> Optional[int]:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 7:
        raise ApiError(400, f"{key}: a rating is an integer from 1 to 7 or null, got {v!r}")
    return v


def _shown_judgement(j: Optional[dict]) -> Optional[dict]:
    """A stored judgement as the annotator gave it (sides as shown, not in source order)."""
    if j is None:
        return None
    sw = bool(j["swapped"])
    return {"judgement_id": j["id"], "pair_id": j["pair_id"], "choice": j["pressed"],
            "rating_A": j["rating_b"] if sw else j["rating_a"], "rating_B": j["rating_a"] if sw else j["rating_b"],
            "note": j["note"], "elapsed_ms": j["elapsed_ms"], "created_at": j["created_at"]}


class LabelApp:
    """The HTTP API over a ``LabelStore``; ``app`` is the Starlette application."""

    def __init__(self, cfg: LabelConfig, store: LabelStore, sampler: Optional[ModelPairSampler] = None,
                 token: Optional[str] = None, reward_fn: Optional[Callable] = None):
        from starlette.applications import Starlette
        from starlette.responses import FileResponse
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        self.cfg, self.store, self.sampler, self.token, self.reward_fn = cfg, store, sampler, token, reward_fn

        async def page(request):
            return FileResponse(STATIC_DIR / "label.html")

        self.app = Starlette(
            routes=[
                Route("/", page),
                Route("/api/info", self.info),
                Route("/api/next", self.next),
                Route("/api/judgements", self.submit, methods=["POST"]),
                Route("/api/stats", self.stats),
                Route("/api/undo", self.undo, methods=["POST"]),
                Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
            ],
            exception_handlers={**exception_handlers(), OperationalError: _database_unavailable},
        )
        self.guidelines = Path(cfg.guidelines).read_text(encoding="utf-8") if cfg.guidelines else None

    # each handler: check the token, do the blocking database work in the thread pool

    async def info(self, request):
        from starlette.concurrency import run_in_threadpool

        check_token(request, self.token)
        names = await run_in_threadpool(self.store.annotator_names)
        return SafeJSONResponse({
            "instructions": self.cfg.instructions, "annotators": names, "source": self.cfg.source,
            "choices": list(CHOICES), "guidelines": self.guidelines,
        })

    async def next(self, request):
        from starlette.concurrency import run_in_threadpool

        check_token(request, self.token)
        name = _annotator(request.query_params.get("annotator"))
        return SafeJSONResponse(await run_in_threadpool(self._next_for, name))

    def _next_for(self, name: str) -> dict:
        # a read: an annotator who has not judged anything yet is not registered by asking
        aid = self.store.annotator_id(name, create=False) or 0  # 0: no annotator has it
        per_pair = self.cfg.judgements_per_pair
        pair = self.store.next_pair(aid, per_pair)
        if pair is None and self.sampler is not None:
            with self.sampler.lock:  # one batch at a time: who waited may find the new pairs ready
                pair = self.store.next_pair(aid, per_pair)
                while pair is None and self.sampler.fill() > 0:
                    pair = self.store.next_pair(aid, per_pair)
        progress = self.store.progress(aid, per_pair)
        if self.sampler is not None:
            progress["total"] += self.sampler.pending
            progress["remaining"] += self.sampler.pending
        shown = None
        if pair is not None:
            swapped = is_swapped(self.cfg.seed, pair["id"], name)
            a, b = pair["completion_a"], pair["completion_b"]
            shown = {"id": pair["id"], "prompt": pair["prompt"], "A": b if swapped else a, "B": a if swapped else b}
        return {"annotator": name, "pair": shown, "progress": progress}

    async def submit(self, request):
        from starlette.concurrency import run_in_threadpool

        check_token(request, self.token)
        body = await read_json_object(request)
        pair_id = body.get("pair_id")
        if isinstance(pair_id, bool) or not isinstance(pair_id, int) or not 1 <= pair_id <= MAX_ID:
            raise ApiError(400, f"pair_id: an integer id from 1 to {MAX_ID}, got {pair_id!r:.60}")
        name = _annotator(body.get("annotator"))
        choice = body.get("choice")
        if choice not in CHOICES:
            raise ApiError(400, f"choice: one of {', '.join(CHOICES)}, got {choice!r:.60}")
        rating_A, rating_B = _rating(body, "rating_A"), _rating(body, "rating_B")
        note = _text_field(body, "note", 10000)
        elapsed = body.get("elapsed_ms")
        if elapsed is not None and (isinstance(elapsed, bool) or not isinstance(elapsed, (int, float))
                                    or not math.isfinite(elapsed) or elapsed < 0):
            raise ApiError(400, f"elapsed_ms: a non-negative number, got {elapsed!r:.60}")
        swapped = is_swapped(self.cfg.seed, pair_id, name)
        verdict = {"A": "b" if swapped else "a", "B": "a" if swapped else "b"}.get(choice, choice)
        values = {
            "verdict": verdict, "pressed": choice, "swapped": swapped,
            "rating_a": rating_B if swapped else rating_A, "rating_b": rating_A if swapped else rating_B,
            "note": (note or "").strip() or None,
            "elapsed_ms": None if elapsed is None else int(min(elapsed, 86_400_000)),  # at most a day
        }

        def commit_then_next() -> tuple[int, dict]:
            aid = self.store.annotator_id(name)
            try:
                jid = self.store.add_judgement(pair_id, aid, **values)
            except UnknownPair:
                raise ApiError(404, f"unknown pair id {pair_id}") from None
            except AlreadyJudged:
                # a retry (e.g. after a lost response): the judgement that is stored, and what is next
                stored = self.store.get_judgement(pair_id, aid)
                return 409, {"error": f"annotator '{name}' already judged pair {pair_id}",
                             "judgement": _shown_judgement(stored), **self._next_for(name)}
            return 201, {"ok": True, "judgement_id": jid, **self._next_for(name)}

        status, answer = await run_in_threadpool(commit_then_next)
        return SafeJSONResponse(answer, status_code=status)

    async def undo(self, request):
        """``POST {"annotator": name}``: delete that annotator's last judgement; answer what it was
        (as shown: ``choice``, ``rating_A``/``rating_B``, ``note``) and that pair again, to re-judge.
        404 when the annotator has nothing left to undo."""
        from starlette.concurrency import run_in_threadpool

        check_token(request, self.token)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        name = _annotator(body.get("annotator"))

        def undo_then_show() -> dict:
            aid = self.store.annotator_id(name, create=False)
            j = self.store.undo_last(aid) if aid is not None else None
            if j is None:
                raise ApiError(404, f"annotator '{name}' has no judgement to undo")
            pair = self.store.get_pair(j["pair_id"])
            swapped = bool(j["swapped"])
            a, b = pair["completion_a"], pair["completion_b"]
            return {
                "ok": True, "annotator": name,
                "undone": {"judgement_id": j["id"], "pair_id": j["pair_id"], "choice": j["pressed"],
                           "rating_A": j["rating_b"] if swapped else j["rating_a"],
                           "rating_B": j["rating_a"] if swapped else j["rating_b"], "note": j["note"]},
                "pair": {"id": pair["id"], "prompt": pair["prompt"], "A": b if swapped else a, "B": a if swapped else b},
                "progress": self.store.progress(aid, self.cfg.judgements_per_pair),
            }

        return SafeJSONResponse(await run_in_threadpool(undo_then_show))

    async def stats(self, request):
        from starlette.concurrency import run_in_threadpool

        check_token(request, self.token)
        return SafeJSONResponse(await run_in_threadpool(quality_report, self.store, self.reward_fn))


# --------------------------------------------------------------------------------------------
# Quality report and export
# --------------------------------------------------------------------------------------------


async def _database_unavailable(request, exc):
    """The database cannot be reached (restarting, network): 503, the client retries; nothing half-written."""
    from rlhfkit.apps.common import error_response

    return error_response(503, "database unavailable, try again in a moment")


def _grouped(store: LabelStore, only: list[str] | None = None) -> tuple[list[dict], dict[int, list[dict]]]:
    pairs = store.all_pairs()
    by_pair: dict[int, list[dict]] = defaultdict(list)
    for j in store.judgement_rows():
        if not only or j["annotator"] in only:
            by_pair[j["pair_id"]].append(j)
    return pairs, by_pair


def quality_report(store: LabelStore, reward_fn: Optional[Callable] = None,
                   only: list[str] | None = None, ties: str = "vote") -> dict:
    """Counts, speed and gold accuracy per annotator; kappa between annotators; agreement of the
    machine label (``prefs``) and of ``reward_fn`` with the human majority."""
    pairs, by_pair = _grouped(store, only)
    per: dict[str, dict] = {}
    for js in by_pair.values():
        for j in js:
            per.setdefault(j["annotator"], {"rows": []})["rows"].append(j)
    gold = {p["id"]: p["gold_label"] for p in pairs if p["gold_label"]}
    gold_acc = agr.gold_accuracy(
        (j["annotator"], j["verdict"], gold[pid]) for pid, js in by_pair.items() if pid in gold for j in js)
    annotators = {}
    for name, d in sorted(per.items()):
        rows = d["rows"]
        annotators[name] = {
            "judgements": len(rows),
            "verdicts": dict(Counter(j["verdict"] for j in rows)),
            **agr.speed([j["elapsed_ms"] for j in rows], [j["created_at"] for j in rows]),
            "gold": gold_acc.get(name),
        }
    votes = {pid: {j["annotator"]: j["verdict"] for j in js if j["verdict"] != "skip"} for pid, js in by_pair.items()}
    human = {}
    for p in pairs:
        counted = [v for v in votes.get(p["id"], {}).values() if not (ties == "abstain" and v == "tie")]
        human[p["id"]] = agr.majority(counted, "majority")
    machine_pairs = [p for p in pairs if p["machine_label"]]
    report = {
        "pairs": len(pairs),
        "pairs_judged": sum(1 for p in pairs if votes.get(p["id"])),
        "judgements": sum(len(js) for js in by_pair.values()),
        "annotators": annotators,
        "agreement": agr.annotator_agreement({pid: v for pid, v in votes.items() if v}),
        "gold_pairs": len(gold),
    }
    if machine_pairs:
        report["machine"] = {
            "majority": agr.label_agreement((human[p["id"]], p["machine_label"]) for p in machine_pairs),
            "per_annotator": {
                name: agr.label_agreement((votes.get(p["id"], {}).get(name), p["machine_label"]) for p in machine_pairs)
                for name in annotators
            },
        }
    if reward_fn is not None:
        decided = [p for p in pairs if human[p["id"]] in ("a", "b")]
        report["reward"] = agr.reward_agreement(
            [p["prompt"] for p in decided], [p["completion_a"] for p in decided],
            [p["completion_b"] for p in decided], [human[p["id"]] for p in decided], reward_fn)
    return report


def _mean(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return mean(xs) if xs else None


def export_rows(store: LabelStore, ex: ExportConfig) -> tuple[list[dict], dict[str, int]]:
    """Preference rows (``prompt, chosen, rejected`` + provenance) and the counts of what was dropped.

    Columns: ``prompt, chosen, rejected, pair_id, source, annotators`` (who voted), ``votes``
    (counted votes), ``agreement`` (share of the votes agreeing with this row), ``chosen_rating``,
    ``rejected_rating`` (mean 1-7 ratings or null), ``gold``, ``machine_agrees`` (``prefs`` pairs:
    whether the machine label picked the same side; else null), ``notes`` (``[{annotator, note}]``,
    every note written on the pair, skips and ties included; in ``each`` mode that annotator's), and
    in ``each`` mode ``annotator``.
    """
    pairs, by_pair = _grouped(store, ex.annotators or None)
    rows: list[dict] = []
    dropped: Counter = Counter()
    for p in pairs:
        js = by_pair.get(p["id"], [])
        if p["gold_label"] and not ex.include_gold:
            dropped["gold"] += 1
            continue
        if not js:
            dropped["unlabelled"] += 1
            continue
        counted = [j for j in js if j["verdict"] != "skip" and not (ex.ties == "abstain" and j["verdict"] == "tie")]
        if not counted:
            dropped["no_votes"] += 1  # only skips (or ties, with ties=abstain)
            continue
        if len(counted) < ex.min_votes:
            dropped["too_few_votes"] += 1
            continue
        verdicts = [j["verdict"] for j in counted]
        if ex.policy == "each":
            winners = [(j["verdict"], [j]) for j in counted if j["verdict"] in ("a", "b")]
            for j in counted:
                if j["verdict"] not in ("a", "b"):
                    dropped[f"judgement_{j['verdict']}"] += 1
        else:
            win = agr.majority(verdicts, ex.policy)
            if win is None:
                dropped["disagreement"] += 1
                continue
            if win not in ("a", "b"):
                dropped[win] += 1
                continue
            winners = [(win, [j for j in counted if j["verdict"] == win])]
        for win, agreeing in winners:
            a_is_chosen = win == "a"
            ra, rb = _mean([j["rating_a"] for j in counted]), _mean([j["rating_b"] for j in counted])
            row = {
                "prompt": p["prompt"],
                "chosen": p["completion_a"] if a_is_chosen else p["completion_b"],
                "rejected": p["completion_b"] if a_is_chosen else p["completion_a"],
                "pair_id": p["id"], "source": p["source"],
                "annotators": sorted(j["annotator"] for j in counted),
                "votes": len(counted),
                "agreement": sum(v == win for v in verdicts) / len(verdicts),
                "chosen_rating": ra if a_is_chosen else rb, "rejected_rating": rb if a_is_chosen else ra,
                "gold": p["gold_label"] is not None,
                "machine_agrees": (p["machine_label"] == win) if p["machine_label"] else None,
                "notes": [{"annotator": j["annotator"], "note": j["note"]} for j in js if j["note"]],
            }
            if ex.policy == "each":
                row["annotator"] = agreeing[0]["annotator"]
                row["chosen_rating"] = agreeing[0]["rating_a" if a_is_chosen else "rating_b"]
                row["rejected_rating"] = agreeing[0]["rating_b" if a_is_chosen else "rating_a"]
                row["notes"] = [n for n in row["notes"] if n["annotator"] == row["annotator"]]
            rows.append(row)
    return rows, dict(dropped)


def report_path(output: str | Path) -> Path:
    p = Path(output)
    return p.with_name(p.stem + ".report.json")


def export(cfg: LabelConfig, store: Optional[LabelStore] = None) -> dict:
    """Write ``cfg.export.output`` (jsonl) and ``<name>.report.json``, both atomically."""
    from rlhfkit.apps.common import json_safe
    from rlhfkit.utils import atomic_write_json, atomic_write_jsonl

    store = store or LabelStore(cfg.db)
    ex = cfg.export
    rows, dropped = export_rows(store, ex)
    report = {
        "output": str(ex.output), "rows": len(rows), "policy": ex.policy, "ties": ex.ties,
        "min_votes": ex.min_votes, "dropped": dropped,
        "quality": quality_report(store, load_reward_function(cfg.reward_function), ex.annotators or None, ex.ties),
    }
    report = json_safe(report)  # NaN (undefined kappa) -> null
    atomic_write_jsonl(ex.output, rows)
    atomic_write_json(report_path(ex.output), report)
    return report


def load_reward_function(spec: Optional[str]) -> Optional[Callable]:
    """``module:function`` -> the callable (None for None)."""
    if not spec:
        return None
    if ":" not in spec:
        raise ConfigError(f"reward_function must look like module:function, got '{spec}'")
    mod, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward_function '{spec}': {e}") from None
    return fn


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

USAGE = """usage: rlhfkit label [serve|export|stats] [--config FILE.yaml] [key=value | --key=value | --key value ...]
  serve   (default) serve the labelling page
  export  write the preference dataset (export.output) and its quality report
  stats   print the quality report (agreement, speed, gold accuracy) as JSON
"""


def build_app(cfg: LabelConfig, store: Optional[LabelStore] = None, token: Optional[str] = None) -> LabelApp:
    """Open the database, load the configured source into it, and return the app."""
    if cfg.source != "none" and not cfg.path:
        raise ConfigError(f"source={cfg.source} needs 'path' (the file of pairs or prompts)")
    store = store or LabelStore(cfg.db)
    sampler = None
    if cfg.source in ("file", "prefs"):
        store.add_pairs(load_pairs(cfg))
    elif cfg.source == "models":
        sampler = ModelPairSampler(cfg, store)
    return LabelApp(cfg, store, sampler, token, load_reward_function(cfg.reward_function))


def main(argv: list[str]) -> int:
    from rlhfkit.cli import parse_args, print_help

    argv = list(argv)
    sub = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "serve"
    config_path, overrides, flags = parse_args(argv)
    if flags["help"]:
        print(USAGE)
        print_help(f"label {sub}", LabelConfig)
        return 0
    cfg = load_config(LabelConfig, config_path, overrides)
    if sub == "export":
        report = export(cfg)
        print(f"wrote {report['rows']} rows to {cfg.export.output} (policy={cfg.export.policy}, "
              f"ties={cfg.export.ties}); dropped: {report['dropped'] or 'none'}; "
              f"report: {report_path(cfg.export.output)}")
        return 0
    if sub == "stats":
        from rlhfkit.apps.common import json_safe

        store = LabelStore(cfg.db)
        print(json.dumps(json_safe(quality_report(store, load_reward_function(cfg.reward_function))), indent=2))
        return 0
    token = resolve_token(cfg.host, cfg.token)
    app = build_app(cfg, token=token)
    print(f"rlhfkit label: {app.store.count_pairs()} pairs in {app.store.url}", file=sys.stderr)
    serve(app.app, cfg.host, cfg.port, token, note="Ctrl-C stops; every judgement is already saved")
    return 0
