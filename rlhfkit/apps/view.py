"""``rlhfkit view RUN_DIR... [--host H] [--port P] [--token T]``: metric curves and evaluation samples.

A read-only page over the files the recipes write; nothing is copied or converted. A RUN_DIR is a
training run, an evaluation folder, or a folder whose sub-folders are runs (one level).

Training run (every training command)::

    config.yaml     the resolved config
    metrics.jsonl   one JSON object per logged step, always with "step", e.g.
                    {"step": 10, "reward/mean": 0.41, "kl": 0.02, "loss": 1.3, "tokens_per_second": 812}
    summary.json    written at the end: command, steps, samples, tokens, train_seconds,
                    tokens_per_second, peak_rss_mb, final

Evaluation folder (``rlhfkit eval``)::

    report.md       the human-readable report (shown as text)
    metrics.json    a JSON object of aggregate numbers (nested objects allowed)
    samples.jsonl   one row per prompt, in this format (the eval recipe follows it):
                    {"prompt": "...",
                     "completions": {"before": "...", "after": "..."},
                     "rewards": {"before": 0.12, "after": 0.57},
                     "gain": 0.45}
                    ``completions`` and ``rewards`` are keyed by model label (any labels, any number;
                    "before"/"after" for a base-vs-trained comparison); ``gain`` is
                    rewards[last label] - rewards[first label] (optional; the page computes it when
                    absent). Extra keys (e.g. "reference", per-component rewards under "rewards") are
                    allowed and shown.
    *.png           plots, shown as images

While a run has no summary.json the page polls ``/api/runs/<id>/metrics?offset=N`` every few
seconds and appends the new rows (a half-written last line waits for the next poll).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rlhfkit.apps.common import (
    STATIC_DIR, ApiError, SafeJSONResponse, check_token, exception_handlers, resolve_token, serve,
)
from rlhfkit.config import UserError

RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml", "report.md", "metrics.json", "samples.jsonl")
LIVE_SECONDS = 300.0  # a run without summary.json whose metrics changed this recently is "running"
MAX_CHUNK = 8 << 20  # bytes of metrics.jsonl sent per poll


@dataclass
class Run:
    id: int
    name: str
    path: Path


def _is_run(p: Path) -> bool:
    return any((p / f).is_file() for f in RUN_FILES)


def discover_runs(dirs: list[str]) -> list[Run]:
    """Each argument is a run, or a folder of runs; errors name the folder."""
    found: list[Path] = []
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise UserError(f"{p}: no such run folder")
        if _is_run(p):
            found.append(p)
            continue
        subs = sorted(s for s in p.iterdir() if s.is_dir() and _is_run(s))
        if not subs:
            raise UserError(f"{p}: no run files here or one level down (looked for {', '.join(RUN_FILES)})")
        found.extend(subs)
    runs, seen = [], set()
    for i, p in enumerate(found):
        name = p.name or str(p)
        if name in seen:
            name = f"{p.parent.name}/{p.name}"
        seen.add(name)
        runs.append(Run(i, name, p))
    return runs


def _read_json(path: Path) -> Optional[object]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # absent, or being written (recipes write atomically, so rarely)


def run_status(run: Run) -> str:
    """``finished`` (summary.json, or an evaluation's report), ``running`` (metrics changed in the last
    few minutes), or ``stopped`` (no summary and no recent metrics: interrupted or crashed)."""
    p = run.path
    if (p / "summary.json").is_file() or (p / "report.md").is_file() or (p / "metrics.json").is_file():
        return "finished"
    m = p / "metrics.jsonl"
    if m.is_file() and time.time() - m.stat().st_mtime < LIVE_SECONDS:
        return "running"
    return "stopped"


def run_info(run: Run) -> dict:
    p = run.path
    config = None
    if (p / "config.yaml").is_file():
        config = (p / "config.yaml").read_text(encoding="utf-8", errors="replace")[:50_000]
    return {
        "id": run.id, "name": run.name, "path": str(p), "status": run_status(run),
        "summary": _read_json(p / "summary.json"), "config": config,
        "has_metrics": (p / "metrics.jsonl").is_file(),
        "eval_metrics": _read_json(p / "metrics.json"),
        "has_report": (p / "report.md").is_file(),
        "has_samples": (p / "samples.jsonl").is_file(),
        "images": sorted(f.name for f in p.glob("*.png")),
    }


def read_metrics(path: Path, offset: int = 0) -> dict:
    """Complete lines of ``metrics.jsonl`` from byte ``offset``: {rows, offset, reset, bad_lines}.

    ``reset`` is true when the file shrank (a run restarted in the same folder): rows start over.
    """
    if not path.is_file():
        return {"rows": [], "offset": 0, "reset": offset > 0, "bad_lines": 0}
    size = path.stat().st_size
    reset = offset > size
    if reset:
        offset = 0
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read(MAX_CHUNK)
    end = chunk.rfind(b"\n") + 1  # a half-written last line waits for the next poll
    rows, bad = [], 0
    for line in chunk[:end].splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return {"rows": rows, "offset": offset + end, "reset": reset, "bad_lines": bad}


def read_samples(path: Path) -> list[dict]:
    """Rows of ``samples.jsonl`` with ``gain`` filled in (last minus first reward) when absent."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        rewards = row.get("rewards")
        if "gain" not in row and isinstance(rewards, dict):
            vals = [v for v in rewards.values() if isinstance(v, (int, float))]
            if len(vals) >= 2:
                row["gain"] = vals[-1] - vals[0]
        rows.append(row)
    return rows


class ViewApp:
    def __init__(self, runs: list[Run], token: Optional[str] = None, poll_seconds: float = 2.0):
        from starlette.applications import Starlette
        from starlette.responses import FileResponse
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        self.runs, self.token, self.poll_seconds = runs, token, poll_seconds

        async def page(request):
            return FileResponse(STATIC_DIR / "view.html")

        self.app = Starlette(
            routes=[
                Route("/", page),
                Route("/api/runs", self.list_runs),
                Route("/api/runs/{rid:int}/metrics", self.metrics),
                Route("/api/runs/{rid:int}/samples", self.samples),
                Route("/api/runs/{rid:int}/report", self.report),
                Route("/api/runs/{rid:int}/images/{name}", self.image),
                Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
            ],
            exception_handlers=exception_handlers(),
        )

    def _run(self, request) -> Run:
        check_token(request, self.token)
        rid = request.path_params["rid"]
        if not 0 <= rid < len(self.runs):
            raise ApiError(404, f"unknown run id {rid}")
        return self.runs[rid]

    async def list_runs(self, request):
        check_token(request, self.token)
        return SafeJSONResponse({"poll_seconds": self.poll_seconds, "runs": [run_info(r) for r in self.runs]})

    async def metrics(self, request):
        run = self._run(request)
        try:
            offset = int(request.query_params.get("offset", "0"))
        except ValueError:
            raise ApiError(400, "offset: an integer") from None
        if offset < 0:
            raise ApiError(400, "offset: must be >= 0")
        out = read_metrics(run.path / "metrics.jsonl", offset)
        out["status"] = run_status(run)
        return SafeJSONResponse(out)

    async def samples(self, request):
        run = self._run(request)
        try:
            offset = int(request.query_params.get("offset", "0"))
            limit = int(request.query_params.get("limit", "500"))
        except ValueError:
            raise ApiError(400, "offset and limit: integers") from None
        rows = read_samples(run.path / "samples.jsonl")
        return SafeJSONResponse({"total": len(rows), "offset": offset, "rows": rows[offset: offset + max(0, limit)]})

    async def report(self, request):
        run = self._run(request)
        p = run.path / "report.md"
        if not p.is_file():
            raise ApiError(404, f"{run.name} has no report.md")
        return SafeJSONResponse({"text": p.read_text(encoding="utf-8", errors="replace")})

    async def image(self, request):
        from starlette.responses import FileResponse

        run = self._run(request)
        name = request.path_params["name"]
        if name not in {f.name for f in run.path.glob("*.png")}:  # only listed files: no path tricks
            raise ApiError(404, f"{run.name} has no image '{name}'")
        return FileResponse(run.path / name, media_type="image/png")


USAGE = """usage: rlhfkit view RUN_DIR [RUN_DIR ...] [--host 127.0.0.1] [--port 8766] [--token T] [--poll SECONDS]
  Serves a page with the metric curves of the runs (live while they train) and the evaluation
  report, samples and plots of evaluation folders. Off loopback a random access token is required.
"""


def parse_view_args(argv: list[str]) -> dict:
    opts: dict = {"dirs": [], "host": "127.0.0.1", "port": 8766, "token": None, "poll": 2.0}
    conv = {"host": str, "port": int, "token": str, "poll": float}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            opts["help"] = True
        elif arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            if key not in conv:
                raise UserError(f"unexpected option '{arg}' (options: --host, --port, --token, --poll)")
            if not value:
                if i + 1 >= len(argv):
                    raise UserError(f"--{key} needs a value")
                value = argv[i + 1]
                i += 1
            try:
                opts[key] = conv[key](value)
            except ValueError:
                raise UserError(f"--{key}: expected {conv[key].__name__}, got '{value}'") from None
        else:
            opts["dirs"].append(arg)
        i += 1
    return opts


def main(argv: list[str]) -> int:
    opts = parse_view_args(list(argv))
    if opts.get("help"):
        print(USAGE)
        return 0
    if not opts["dirs"]:
        raise UserError("give at least one RUN_DIR (rlhfkit view runs/ppo runs/eval)")
    runs = discover_runs(opts["dirs"])
    token = resolve_token(opts["host"], opts["token"])
    print("rlhfkit view: " + ", ".join(f"{r.name} ({r.path})" for r in runs), file=sys.stderr)
    serve(ViewApp(runs, token, opts["poll"]).app, opts["host"], opts["port"], token)
    return 0
