"""Small helpers shared by every layer: atomic file writes, seeding, memory, logging."""
from __future__ import annotations

import json
import logging
import os
import random
import resource
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger("rlhfkit")


class _ConsoleHandler(logging.Handler):
    """``[rlhfkit]`` lines on the current ``sys.stderr`` (looked up per line, so a replaced stream is
    followed), through ``tqdm.write``: a line printed while a progress bar is drawn goes above the
    bar instead of breaking it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


_SHOWN_WARNINGS: set = set()


def _show_warning_once(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the console: each (category, message) once per process, however
    often a library's warning registry is reset (any ``catch_warnings`` resets it, and a warning
    raised inside a training loop then repeats every iteration), written above progress bars."""
    key = (category, str(message))
    if key in _SHOWN_WARNINGS:
        return
    _SHOWN_WARNINGS.add(key)
    from tqdm import tqdm

    tqdm.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), file=file or sys.stderr)


def setup_logging(level: int = logging.INFO) -> None:
    """``[rlhfkit]`` log lines on stderr, and library warnings shown once each (the console script)."""
    recording = getattr(getattr(warnings, "_showwarnmsg_impl", None), "__name__", "") != "_showwarnmsg_impl"
    if warnings.showwarning is getattr(warnings, "_showwarning_orig", None) and not recording:
        warnings.showwarning = _show_warning_once  # not inside catch_warnings(record=True), e.g. pytest
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("[rlhfkit] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    # bitsandbytes (imported by peft whenever it is installed) looks up a hub kernel for its CPU
    # 4-bit matmul at import and warns when the hub is unreachable, on every run, quantised or not;
    # it then uses its own CPU kernel, so the warning says nothing a user can act on
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON line and flush it to disk (a killed process loses no finished row)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_freed_memory(trim_mb: int = 256) -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    An ILQL step allocates and frees tens of MB of (tokens, vocabulary) temporaries (logits, Q
    values, their gradients). By default glibc gives them back and the next step page-faults
    them in again: on benchmarks/ilql.py that was ~17,000 page faults and 33 ms of kernel time per
    step (9%). Raising M_TRIM_THRESHOLD and M_MMAP_THRESHOLD (its 32 MB maximum) keeps them in the
    heap (mallopt(3)); peak memory is unchanged. A no-op (False) where libc is not glibc.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, trim_mb << 20)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
