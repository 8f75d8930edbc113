"""``generation.backend: openai``: generation from an OpenAI-compatible endpoint, with a response cache.

For generation-only commands (eval, prefs, judge, constitutional, redteam); training commands
refuse it (``backends.require_training_backend``): an endpoint cannot hold the weights being trained.

* Prompts that ``rlhfkit.generation.generate`` gets (already rendered with the chat template where
  the recipe uses one) go to the **completions** endpoint as text; conversations
  (``feedback.ChatGenerator``: constitutional, redteam) and judge prompts go to the **chat**
  endpoint as messages.
* Sampling maps from ``GenerationConfig``: ``do_sample=false`` is temperature 0; ``temperature``,
  ``top_p``, ``max_tokens``, ``n`` (rows that repeat a prompt are one request) and a ``seed`` per
  request drawn from torch's generator (a seeded run asks the same questions again); ``top_k``,
  ``min_tokens`` and ``repetition_penalty`` are not in the OpenAI API and go as extra body fields
  (vLLM's server reads them) only when set.
* The ``openai`` client does the HTTP: timeouts, and retries with exponential backoff on
  connection errors, timeouts and 408/409/429/5xx (``max_retries``). After the last retry the
  command stops with one ``error:`` line naming the endpoint.
* ``max_concurrency`` requests are in flight at once (threads).
* Every answer is written to the cache as it arrives (SQLite, one row per request, keyed by the
  endpoint, the model and the whole request body): a re-run sends only what is not answered yet,
  and a run that stops half-way keeps what it got.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Optional

import torch

from rlhfkit.config import ConfigError, GenerationConfig, OpenAIConfig, UserError

INSTALL = "pip install 'rlhfkit[openai]'"


def make_client(cfg: OpenAIConfig):
    try:
        import openai
    except ImportError:
        raise ConfigError(f"generation.backend=openai needs the openai client: {INSTALL}") from None
    key = os.environ.get(cfg.api_key_env) or "EMPTY"
    return openai.OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout, max_retries=cfg.max_retries)


class ResponseCache:
    """Answers by request key in ``<folder>/responses.sqlite``; safe across threads, and each
    answer is committed on arrival."""

    def __init__(self, folder: Optional[str]):
        self.db = None
        self.lock = threading.Lock()
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(Path(folder) / "responses.sqlite"), check_same_thread=False)
            self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.commit()

    def get(self, key: str) -> Optional[dict]:
        if self.db is None:
            return None
        with self.lock:
            row = self.db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict) -> None:
        if self.db is None:
            return
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(value)))
            self.db.commit()

    def __len__(self) -> int:
        if self.db is None:
            return 0
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


def request_key(cfg: OpenAIConfig, endpoint: str, body: dict) -> str:
    return hashlib.sha256(json.dumps([cfg.base_url, cfg.model, endpoint, body], sort_keys=True).encode()).hexdigest()


def run_requests(cfg: OpenAIConfig, endpoint: str, bodies: list[dict], progress: bool = False,
                 desc: str = "requests") -> list[list[str]]:
    """The texts of the choices of each request (``endpoint`` ``completions`` or ``chat``),
    answered from the cache where possible, the rest ``max_concurrency`` at a time."""
    import openai

    cache = ResponseCache(cfg.cache)
    client = make_client(cfg)
    keys = [request_key(cfg, endpoint, b) for b in bodies]
    results: list[Optional[list[str]]] = [None] * len(bodies)
    for i, k in enumerate(keys):
        hit = cache.get(k)
        if hit is not None:
            results[i] = hit["texts"]
    todo = [i for i, r in enumerate(results) if r is None]

    def ask(i: int) -> None:
        body = dict(bodies[i])
        try:
            if endpoint == "chat":
                r = client.chat.completions.create(model=cfg.model, **body)
                texts = [c.message.content or "" for c in sorted(r.choices, key=lambda c: c.index)]
            else:
                r = client.completions.create(model=cfg.model, **body)
                texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
        except openai.APIStatusError as e:
            raise UserError(f"generation.openai: {cfg.base_url}: HTTP {e.status_code} from model '{cfg.model}' "
                            f"({_first_line(e.message)})") from None
        except openai.APIError as e:  # connection error or timeout, after the client's retries
            raise UserError(f"generation.openai: {cfg.base_url}: no answer after {cfg.max_retries} retries "
                            f"({type(e).__name__}: {_first_line(str(e))})") from None
        cache.put(keys[i], {"texts": texts})
        results[i] = texts

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=desc, unit="request", dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency)
    try:
        futures = {pool.submit(ask, i) for i in todo}
        while futures:
            done, futures = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                f.result()  # the first failure stops the run (answered requests are cached)
                if bar is not None:
                    bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        cache.close()
        if bar is not None:
            bar.close()
    return results  # type: ignore[return-value]


def _first_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0][:300] if text else "no message"


def sampling_body(gen: GenerationConfig, max_new_tokens: int, n: int) -> dict:
    """Request fields for ``n`` samples under ``gen`` (see the module docstring)."""
    body: dict = {"max_tokens": max_new_tokens, "n": n}
    if gen.do_sample:
        body.update(temperature=gen.temperature, top_p=gen.top_p, seed=int(torch.randint(0, 2**31 - 1, ())))
    else:
        body.update(temperature=0.0)
    extra = {}
    if gen.do_sample and gen.top_k:
        extra["top_k"] = gen.top_k
    if gen.min_new_tokens:
        extra["min_tokens"] = gen.min_new_tokens
    if gen.repetition_penalty != 1.0:
        extra["repetition_penalty"] = gen.repetition_penalty
    if extra:
        body["extra_body"] = extra
    return body


def _grouped(items: list, key) -> dict:
    groups: dict = {}
    for i, x in enumerate(items):
        groups.setdefault(key(x), []).append(i)
    return groups


def complete(prompts: list[str], gen: GenerationConfig, max_new_tokens: int, progress: bool = False,
             desc: str = "generate") -> list[str]:
    """Completions of text ``prompts`` (completions endpoint); repeated prompts share a request."""
    groups = _grouped(prompts, lambda p: p)
    bodies = [{"prompt": p, **sampling_body(gen, max_new_tokens, len(rows))} for p, rows in groups.items()]
    return _scatter(groups, run_requests(gen.openai, "completions", bodies, progress, desc), len(prompts))


def chat(conversations: list[list[dict]], gen: GenerationConfig, max_new_tokens: Optional[int] = None,
         progress: bool = False, desc: str = "generate", response_format: Optional[dict] = None) -> list[str]:
    """Replies to ``conversations`` (chat endpoint); repeated conversations share a request."""
    groups = _grouped(conversations, lambda c: json.dumps(c, sort_keys=True))
    bodies = []
    for c, rows in groups.items():
        body = {"messages": json.loads(c), **sampling_body(gen, max_new_tokens or gen.max_new_tokens, len(rows))}
        if response_format is not None:
            body["response_format"] = response_format
        bodies.append(body)
    return _scatter(groups, run_requests(gen.openai, "chat", bodies, progress, desc), len(conversations))


def _scatter(groups: dict, answers: list[list[str]], n: int) -> list[str]:
    """The answers of each request (one per row of its group) back in the callers' row order."""
    out = [""] * n
    for rows, texts in zip(groups.values(), answers):
        for r, t in zip(rows, texts):
            out[r] = t.strip()
    return out
