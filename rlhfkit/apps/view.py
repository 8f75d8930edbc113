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
seconds and appends the new rows (a half-written last line waits for the next poll). A run folder
that appears later inside a folder given on the command line is picked up by the next poll of
``/api/runs`` (the page keeps polling, five times slower, once every run has finished).

The page draws one uPlot chart per metric (vendored in ``static/vendor/``, MIT): hover values,
drag to zoom (double-click resets), EMA smoothing, log scale, metric search and groups (reward, KL,
losses, speed, other), and a diff of ``config.yaml`` between the runs ticked in the runs table.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
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


def _found(dirs: list[str], strict: bool = True) -> list[Path]:
    found: list[Path] = []
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            if strict:
                raise UserError(f"{p}: no such run folder")
            continue
        if _is_run(p):
            found.append(p)
            continue
        subs = sorted(s for s in p.iterdir() if s.is_dir() and _is_run(s))
        if not subs and strict:
            raise UserError(f"{p}: no run files here or one level down (looked for {', '.join(RUN_FILES)})")
        found.extend(subs)
    return found


def _add_runs(runs: list[Run], paths: list[Path]) -> list[Run]:
    """Append the runs of ``paths`` not yet in ``runs`` (ids stay stable: new ones go last)."""
    known = {r.path.resolve() for r in runs}
    names = {r.name for r in runs}
    added = []
    for p in paths:
        if p.resolve() in known:
            continue
        known.add(p.resolve())
        name = p.name or str(p)
        if name in names:
            name = f"{p.parent.name}/{p.name}"
        names.add(name)
        run = Run(len(runs), name, p)
        runs.append(run)
        added.append(run)
    return added


def discover_runs(dirs: list[str]) -> list[Run]:
    """Each argument is a run, or a folder of runs; errors name the folder."""
    runs: list[Run] = []
    _add_runs(runs, _found(dirs))
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


def flat_config(text: Optional[str]) -> Optional[dict]:
    """``config.yaml`` as dotted keys -> values (lists kept whole), for the page's config diff; None
    when absent or not a YAML mapping."""
    import yaml

    if text is None:
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(data, dict):
        return None
    out: dict = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(data, "")
    return out


def run_info(run: Run) -> dict:
    p = run.path
    config = None
    if (p / "config.yaml").is_file():
        config = (p / "config.yaml").read_text(encoding="utf-8", errors="replace")[:50_000]
    return {
        "id": run.id, "name": run.name, "path": str(p), "status": run_status(run),
        "summary": _read_json(p / "summary.json"), "config": config, "config_values": flat_config(config),
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
    def __init__(self, runs: list[Run], token: Optional[str] = None, poll_seconds: float = 2.0,
                 roots: Optional[list[str]] = None):
        """``roots``: the folders given on the command line; a run folder that appears in one of them
        later (a new sub-folder with run files) is added to ``runs`` on the next ``/api/runs``."""
        from starlette.applications import Starlette
        from starlette.responses import FileResponse
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        self.runs, self.token, self.poll_seconds = runs, token, poll_seconds
        self.roots = list(roots or [])

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
        if self.roots:
            _add_runs(self.runs, _found(self.roots, strict=False))
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


USAGE = """usage: rlhfkit view RUN_DIR [RUN_DIR ...] [--config view.yaml] [--port 8766 | port=8766] [...]
  Serves a page with the metric curves of the runs (live while they train) and the evaluation
  report, samples and plots of evaluation folders. Off loopback a random access token is required.
  Options take the same three forms as every command: key=value, --key=value, --key value.
"""


@dataclass
class ViewConfig:
    runs: list[str] = field(default_factory=list)
    """Run folders (or folders of runs) to show; the RUN_DIR arguments are appended to this list."""
    host: str = "127.0.0.1"
    """Address to listen on. Any non-loopback address turns the access token on."""
    port: int = 8766
    """Port to listen on (0: a free port)."""
    token: Optional[str] = None
    """Access token every API call must carry. None: a random one when ``host`` is not loopback."""
    poll: float = 2.0
    """Seconds between the page's refreshes while a run is live (new steps, new run folders)."""

    def validate(self) -> None:
        from rlhfkit.config import ConfigError

        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.poll <= 0:
            raise ConfigError(f"poll must be > 0, got {self.poll}")


def parse_view_args(argv: list[str]) -> tuple[ViewConfig, bool]:
    """``RUN_DIR ...`` plus the options of ``ViewConfig`` in any of the CLI's forms -> (config, help)."""
    from rlhfkit.cli import parse_args
    from rlhfkit.config import load_config

    dirs: list[str] = []
    config_path, overrides, flags = parse_args(argv, positional=dirs)
    if flags["help"]:
        return ViewConfig(), True
    cfg = load_config(ViewConfig, config_path, overrides)
    return dataclasses.replace(cfg, runs=[*cfg.runs, *dirs]), False


def main(argv: list[str]) -> int:
    cfg, want_help = parse_view_args(list(argv))
    if want_help:
        from rlhfkit.cli import print_help

        print(USAGE)
        print_help("view", ViewConfig)
        return 0
    if not cfg.runs:
        raise UserError("give at least one RUN_DIR (rlhfkit view runs/ppo runs/eval)")
    runs = discover_runs(cfg.runs)
    token = resolve_token(cfg.host, cfg.token)
    print("rlhfkit view: " + ", ".join(f"{r.name} ({r.path})" for r in runs), file=sys.stderr)
    serve(ViewApp(runs, token, cfg.poll, roots=cfg.runs).app, cfg.host, cfg.port, token)
    return 0
