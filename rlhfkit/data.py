"""Data: read rows, check their schema, build prompts, tokenize, batch.

Sources (``DataConfig.path``): ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` files, a
``datasets.save_to_disk`` folder, or a hub dataset name read with ``datasets.load_dataset``.
Local files are parsed here row by row so that a bad row is reported as ``file, row N, column``
(rows count from 1; for jsonl the row is the line number).

Row schemas the recipes read (names after ``DataConfig.columns`` mapping):
- prompt / completion (SFT), optionally built with ``prompt_template`` from any columns
  (``"Summarize ...\\n\\n{dialogue}\\n\\nSummary:"`` with completion column ``summary``);
- chat ``messages`` (list of {role, content}); the last assistant turn is the completion;
- preferences ``prompt/chosen/rejected``; ``chosen/rejected`` full dialogues with a shared prefix
  (hh-rlhf: the prompt is the common part up to the last ``Assistant:``); chat-message
  ``chosen/rejected`` lists (the prompt is their common first turns).
Nothing is dropped silently: every drop is counted in ``DataStats`` and logged.
"""
from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from rlhfkit.config import DataConfig, UserError
from rlhfkit.utils import logger

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Table:
    """Rows read from one source, with a printable source name for error messages."""

    rows: list[dict]
    source: str
    row_numbers: list[int] = field(default_factory=list)

    def where(self, i: int) -> str:
        n = self.row_numbers[i] if self.row_numbers else i + 1
        return f"{self.source}: row {n}"


@dataclass
class DataStats:
    """What happened to the rows: counts written to the summary."""

    rows: int = 0
    dropped_invalid: int = 0
    dropped_identical: int = 0
    truncated: int = 0
    dropped_overlong: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_table(path: str, split: str = "train", subset: Optional[str] = None) -> Table:
    """Read rows from a local file, a ``save_to_disk`` folder, or a hub dataset name; no rows at all
    is an error naming the source."""
    key = _prefetch_key(path, split, subset)
    table = _PREFETCHED.pop(key, None) if key else None
    if table is None:
        table = _read_any(path, split, subset)
    else:
        table = Table([dict(r) for r in table.rows], table.source, list(table.row_numbers))
    if not table.rows:
        raise UserError(f"{table.source}: no rows (the file or split is empty)")
    return table


_PREFETCHED: dict[tuple, Table] = {}
"""Tables read by ``check_data`` before the models load, each handed to the next ``read_table`` of
the same source (once), so the check costs no second parse."""


def _prefetch_key(path: str, split: str, subset: Optional[str]) -> Optional[tuple]:
    p = Path(path) if path else None
    if p is None or not p.is_file():
        return None
    st = p.stat()
    return (str(p.resolve()), split, subset, st.st_size, st.st_mtime_ns)


def check_data(cfg: Any) -> None:
    """Read every local data file a command's config names (each ``DataConfig`` section with a
    path): a file that is not UTF-8, malformed, empty or matches no ``data.where`` row is reported
    now, before any model loads, instead of after."""
    import dataclasses

    _PREFETCHED.clear()
    for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(cfg) else []:
        dc = getattr(cfg, f.name)
        if not isinstance(dc, DataConfig) or not dc.path:
            continue
        for path, split in ((dc.path, dc.split), (dc.eval_path, dc.eval_split or dc.split)):
            key = _prefetch_key(path, split, dc.subset) if path else None
            if key is None:
                continue
            table = read_table(path, split, dc.subset)
            select(table, dc.where)
            _PREFETCHED[key] = table


def _read_any(path: str, split: str, subset: Optional[str]) -> Table:
    if not path:
        raise UserError("data.path is empty: give a file, a datasets folder or a hub dataset name")
    p = Path(path)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(p)
        if suffix == ".json":
            return _read_json(p)
        if suffix == ".csv":
            return _read_csv(p)
        if suffix == ".parquet":
            return _read_parquet(p)
        raise UserError(f"{p}: unsupported file type '{suffix}' (use {', '.join(LOCAL_SUFFIXES)})")
    if p.is_dir():
        return _read_saved_dataset(p, split)
    if p.suffix.lower() in LOCAL_SUFFIXES or path.startswith((".", "/")):
        raise UserError(f"{path}: file not found")
    return _read_hub(path, split, subset)


def _decode(p: Path, data: bytes, line_offset: int = 0, unit: str = "row") -> str:
    """``data`` as UTF-8 text (a leading byte-order mark dropped), or a UserError naming the row
    (line) and column of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1 + line_offset
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{p}: {unit} {line}: column {col}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                        f"save the file as UTF-8") from None


def _read_jsonl(p: Path) -> Table:
    rows, numbers = [], []
    with open(p, "rb") as f:
        for n, raw in enumerate(f, start=1):
            line = _decode(p, raw[3:] if n == 1 and raw.startswith(b"\xef\xbb\xbf") else raw, n - 1)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if e.pos >= len(line.rstrip()) or e.msg.startswith("Unterminated string"):
                    # the line stops inside a value (json names where the open string began): truncated
                    raise UserError(f"{p}: row {n}: column {len(line.rstrip()) + 1}: malformed JSON: the line "
                                    f"ends before its object does ({e.msg}; truncated?)") from None
                raise UserError(f"{p}: row {n}: column {e.colno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{p}: row {n}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
            numbers.append(n)
    return Table(rows, str(p), numbers)


def _read_json(p: Path) -> Table:
    text = _decode(p, p.read_bytes(), unit="line")
    if not text.strip():
        return Table([], str(p))
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: line {e.lineno}: column {e.colno}: malformed JSON ({e.msg})") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1:
            obj = lists[0]
    if not isinstance(obj, list):
        raise UserError(f"{p}: expected a list of objects (or an object holding one list)")
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise UserError(f"{p}: row {i + 1}: expected a JSON object, got {type(r).__name__}")
    return Table(obj, str(p))


def _check_csv_quotes(p: Path, text: str) -> None:
    """RFC 4180 quoting: a quote opens a field (a quoted field) or is doubled inside one; a quote
    anywhere else (``Summarize: "hi"``, ``"a"b``) or an unclosed quoted field is a UserError naming
    the row and column. Python's csv module reads those leniently, shifting columns."""
    import io

    in_quotes, open_at = False, (0, 0)
    for n, line in enumerate(io.StringIO(text, newline=""), start=1):  # lines as csv counts them
        if not in_quotes and '"' not in line:
            continue
        i, field_start = 0, True
        while i < len(line):
            c = line[i]
            if in_quotes:
                if c == '"':
                    if line[i + 1: i + 2] == '"':
                        i += 2
                        continue
                    in_quotes = False
                    if line[i + 1: i + 2] not in (",", "\r", "\n", ""):
                        opened = f" (the quoted field opened at row {open_at[0]})" if open_at[0] != n else ""
                        raise UserError(f"{p}: row {n}: column {i + 2}: text after a closing quote{opened}; a "
                                        f"field holding a quote must be quoted, with the quote doubled")
            elif c == '"':
                if not field_start:
                    raise UserError(f"{p}: row {n}: column {i + 1}: stray quote inside an unquoted field; a field "
                                    f"holding a quote must be quoted, with the quote doubled")
                in_quotes, open_at = True, (n, i + 1)
            field_start = not in_quotes and c in ",\r\n"
            i += 1
    if in_quotes:
        raise UserError(f"{p}: row {open_at[0]}: column {open_at[1]}: this quote is never closed")


def _read_csv(p: Path) -> Table:
    """Strict CSV (RFC 4180 with a header): a quote inside an unquoted field, text after a closing
    quote, an unclosed quote or a row with more or fewer fields than the header is an error naming
    the row (the line on which the record starts), never a row read with shifted columns."""
    import io

    text = _decode(p, p.read_bytes())
    _check_csv_quotes(p, text)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            return Table([], str(p), [])
        header = [h.strip() for h in header]
        if any(not h for h in header) or len(set(header)) != len(header):
            raise UserError(f"{p}: row 1: the header needs distinct, non-empty column names (got {header})")
        rows, numbers = [], []
        start = reader.line_num + 1
        for record in reader:
            if record == []:  # a blank line
                start = reader.line_num + 1
                continue
            if len(record) != len(header):
                raise UserError(f"{p}: row {start}: {len(record)} fields, the header has {len(header)} "
                                f"({', '.join(header)}); quote fields that hold a comma")
            rows.append(dict(zip(header, record)))
            numbers.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{p}: row {start}: malformed CSV ({e}); a field holding a quote must be quoted, "
                        f"with the quote doubled") from None
    return Table(rows, str(p), numbers)


def _read_parquet(p: Path) -> Table:
    import pyarrow.parquet as pq

    try:
        return Table(pq.read_table(p).to_pylist(), str(p))
    except Exception as e:  # pyarrow raises several types for broken files
        raise UserError(f"{p}: cannot read parquet ({e})") from None


def _read_saved_dataset(p: Path, split: str) -> Table:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        raise UserError(f"{p}: folder is not a datasets.save_to_disk folder") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{p}: no split '{split}' (splits: {', '.join(ds)})")
        ds = ds[split]
    return Table(ds.to_list(), f"{p}[{split}]")


def _read_hub(name: str, split: str, subset: Optional[str]) -> Table:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:
        raise UserError(f"{name}: cannot load dataset ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return Table(ds.to_list(), f"{name}[{split}]")


def load_splits(cfg: DataConfig) -> tuple[Table, Optional[Table]]:
    """Train and held-out tables per the config (eval_path, eval_split, or a seeded fraction)."""
    train = select(read_table(cfg.path, cfg.split, cfg.subset), cfg.where)
    if cfg.eval_path:
        held = select(read_table(cfg.eval_path, cfg.eval_split or cfg.split, cfg.subset), cfg.where)
    elif cfg.eval_split:
        held = select(read_table(cfg.path, cfg.eval_split, cfg.subset), cfg.where)
    elif cfg.eval_fraction > 0 and len(train.rows) > 1:
        order = list(range(len(train.rows)))
        random.Random(cfg.shuffle_seed).shuffle(order)
        n_eval = max(1, int(round(len(order) * cfg.eval_fraction)))
        held = _subset(train, sorted(order[:n_eval]))
        train = _subset(train, sorted(order[n_eval:]))
    else:
        held = None
    if cfg.max_rows is not None:
        train = _subset(train, list(range(min(cfg.max_rows, len(train.rows)))))
    return train, held


def select(t: Table, where: dict[str, str]) -> Table:
    """Rows whose columns equal ``where``'s values (compared as text); an unknown column is an error."""
    if not where:
        return t
    for col in where:
        if t.rows and col not in t.rows[0]:
            raise UserError(f"{t.where(0)}: data.where names column '{col}', which the data does not have")
    keep = [i for i, r in enumerate(t.rows) if all(str(r.get(c)) == str(v) for c, v in where.items())]
    if not keep:
        raise UserError(f"{t.source}: no row matches data.where {where}")
    return _subset(t, keep)


def _subset(t: Table, idx: list[int]) -> Table:
    nums = t.row_numbers or list(range(1, len(t.rows) + 1))
    return Table([t.rows[i] for i in idx], t.source, [nums[i] for i in idx])


# ---------------------------------------------------------------------------------------------
# Schema checks and prompt building
# ---------------------------------------------------------------------------------------------


def column(row: dict, name: str, cfg: DataConfig) -> Any:
    return row.get(cfg.columns.get(name, name))


def require_text(table: Table, i: int, name: str, cfg: DataConfig, allow_empty: bool = False) -> str:
    """The string in column ``name`` (after mapping) of row ``i``, or a UserError naming it."""
    col = cfg.columns.get(name, name)
    row = table.rows[i]
    if col not in row:
        raise UserError(f"{table.where(i)}: missing column '{col}' (columns: {', '.join(map(str, row))})")
    value = row[col]
    if not isinstance(value, str):
        raise UserError(f"{table.where(i)}: column '{col}' must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise UserError(f"{table.where(i)}: column '{col}' is empty")
    return value


def use_chat_template(tokenizer, cfg: DataConfig) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat_template == "true" and not has:
        raise UserError("data.chat_template=true but the tokenizer has no chat template")
    return has if cfg.chat_template == "auto" else cfg.chat_template == "true"


def render_messages(messages: list[dict], tokenizer, add_generation_prompt: bool = True) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def user_prompt(table: Table, i: int, cfg: DataConfig) -> str:
    """The prompt text of row ``i`` before any chat template: ``prompt_template`` or ``prompt``."""
    row = table.rows[i]
    if cfg.prompt_template is None:
        return require_text(table, i, "prompt", cfg)
    try:
        return cfg.prompt_template.format(**row)
    except KeyError as e:
        raise UserError(
            f"{table.where(i)}: prompt_template needs column {e} (columns: {', '.join(map(str, row))})"
        ) from None
    except (IndexError, ValueError) as e:
        raise UserError(f"data.prompt_template is not a valid format string ({e})") from None


def build_prompt(table: Table, i: int, cfg: DataConfig, tokenizer) -> str:
    """The prompt text of row ``i``: template or ``prompt`` column, wrapped in the chat template."""
    return wrap_prompt(user_prompt(table, i, cfg), cfg, tokenizer)


def wrap_prompt(user: str, cfg: DataConfig, tokenizer) -> str:
    if tokenizer is None or not use_chat_template(tokenizer, cfg):
        return user
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
        {"role": "user", "content": user}
    ]
    return render_messages(messages, tokenizer)


def messages_prompt(messages: list[dict], tokenizer, cfg: DataConfig) -> str:
    """The prompt before an assistant turn: the chat template, or ``role: content`` lines without one."""
    if use_chat_template(tokenizer, cfg):
        return render_messages(messages, tokenizer)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"


def check_messages(table: Table, i: int, name: str, cfg: DataConfig) -> list[dict]:
    col = cfg.columns.get(name, name)
    msgs = table.rows[i].get(col)
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{table.where(i)}: column '{col}' must be a non-empty list of messages")
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
            raise UserError(f"{table.where(i)}: column '{col}': each message needs 'role' and text 'content'")
    if msgs[-1]["role"] != "assistant":
        raise UserError(f"{table.where(i)}: column '{col}': the last message must be the assistant's")
    return msgs


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """hh-rlhf rows: (prompt, chosen_completion, rejected_completion) from two full dialogues.

    The prompt is the common prefix cut back to the end of its last ``Assistant:`` marker (so
    both completions are the final assistant turn); without a marker, to the last whitespace.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    prefix = chosen[:n]
    marker = "Assistant:"
    cut = prefix.rfind(marker)
    if cut >= 0:
        n = cut + len(marker)
    else:
        ws = max(prefix.rfind(" "), prefix.rfind("\n"))
        n = ws + 1 if ws >= 0 else 0
    return chosen[:n], chosen[n:], rejected[n:]


def parse_rows(table: Table, cfg: DataConfig, stats: DataStats, parse: Callable[[int, dict], Any]) -> list:
    """``parse(i, row)`` for every row. A row whose parse raises UserError stops the run, or with
    ``data.drop_invalid`` is dropped and counted; ``None`` results are skipped (counted by parse)."""
    out = []
    for i, row in enumerate(table.rows):
        try:
            item = parse(i, row)
        except UserError as e:
            if not cfg.drop_invalid:
                raise
            stats.dropped_invalid += 1
            logger.warning(f"dropped: {e}")
            continue
        if item is not None:
            out.append(item)
    stats.rows = len(out)
    _log_drops(stats, table.source)
    return out


def sft_examples(table: Table, cfg: DataConfig, tokenizer, stats: DataStats) -> list[tuple[str, str]]:
    """(prompt, completion) text pairs: template/prompt + completion columns, or chat messages."""
    chat_col = cfg.columns.get("messages", "messages")

    def parse(i: int, row: dict) -> tuple[str, str]:
        if chat_col in row and cfg.prompt_template is None and cfg.columns.get("prompt", "prompt") not in row:
            msgs = check_messages(table, i, "messages", cfg)
            return messages_prompt(msgs[:-1], tokenizer, cfg), msgs[-1]["content"]
        return build_prompt(table, i, cfg, tokenizer), require_text(table, i, "completion", cfg)

    return parse_rows(table, cfg, stats, parse)


def preference_examples(table: Table, cfg: DataConfig, tokenizer, stats: DataStats) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) triples from any of the three preference layouts.

    Rows where chosen == rejected carry no preference: an error, or with ``drop_invalid`` a
    counted drop.
    """
    c_col, r_col = cfg.columns.get("chosen", "chosen"), cfg.columns.get("rejected", "rejected")
    p_col = cfg.columns.get("prompt", "prompt")

    def parse(i: int, row: dict) -> Optional[tuple[str, str, str]]:
        if isinstance(row.get(c_col), list):
            c_msgs = check_messages(table, i, "chosen", cfg)
            r_msgs = check_messages(table, i, "rejected", cfg)
            if c_msgs[:-1] != r_msgs[:-1]:
                raise UserError(f"{table.where(i)}: chosen and rejected conversations differ before the last turn")
            prompt = messages_prompt(c_msgs[:-1], tokenizer, cfg)
            chosen, rejected = c_msgs[-1]["content"], r_msgs[-1]["content"]
        elif p_col in row or cfg.prompt_template is not None:
            prompt = build_prompt(table, i, cfg, tokenizer)
            chosen = require_text(table, i, "chosen", cfg)
            rejected = require_text(table, i, "rejected", cfg)
        else:
            full_c = require_text(table, i, "chosen", cfg)
            full_r = require_text(table, i, "rejected", cfg)
            prompt, chosen, rejected = split_shared_prefix(full_c, full_r)
            if not chosen.strip() or not rejected.strip():
                raise UserError(f"{table.where(i)}: chosen and rejected share everything but an empty tail")
        if chosen == rejected:
            if cfg.drop_invalid:
                stats.dropped_identical += 1
                return None
            raise UserError(f"{table.where(i)}: column '{c_col}' equals column '{r_col}' (no preference)")
        return prompt, chosen, rejected

    return parse_rows(table, cfg, stats, parse)


def prompt_examples(table: Table, cfg: DataConfig, tokenizer, stats: DataStats) -> list[tuple[str, dict]]:
    """(prompt, row) pairs for online recipes; the row's other columns go to reward functions."""
    return parse_rows(table, cfg, stats, lambda i, row: (build_prompt(table, i, cfg, tokenizer), row))


def _log_drops(stats: DataStats, source: str) -> None:
    dropped = stats.dropped_invalid + stats.dropped_identical
    if dropped:
        logger.warning(
            f"{source}: dropped {stats.dropped_invalid} invalid and {stats.dropped_identical} chosen==rejected rows"
        )


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt: str, is_seq2seq: bool) -> list[int]:
    """Prompt ids. A chat-templated prompt already holds its special tokens."""
    special = is_seq2seq or not _starts_with_template(tokenizer, prompt)
    return tokenizer(prompt, add_special_tokens=special)["input_ids"]


def _starts_with_template(tokenizer, prompt: str) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(getattr(tokenizer, "chat_template", None)) and (
        (bos is not None and prompt.startswith(bos)) or prompt.startswith("<|")
    )


def encode_completion(tokenizer, completion: str, is_seq2seq: bool) -> list[int]:
    """Completion ids ending in EOS (seq2seq tokenizers such as T5's add it themselves)."""
    if is_seq2seq:
        ids = tokenizer(completion, add_special_tokens=True)["input_ids"]
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids = ids + [tokenizer.eos_token_id]
        return ids
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def fit_lengths(prompt: list[int], completion: list[int], cfg: DataConfig, max_length: int, stats: DataStats,
                is_seq2seq: bool) -> Optional[tuple[list[int], list[int]]]:
    """Apply the over-long policy: truncate (prompt from the left, completion from the right) or drop."""
    max_p, max_c = cfg.max_prompt_length, cfg.max_completion_length
    if not is_seq2seq:  # prompt + completion share max_length; a long prompt still leaves the completion min(its length, max_length // 2)
        c_len = min(len(completion), max_c, max_length // 2)
        max_p = min(max_p, max_length - c_len)
        max_c = min(max_c, max_length - min(len(prompt), max_p))
    if len(prompt) <= max_p and len(completion) <= max_c:
        return prompt, completion
    if cfg.overlong == "drop":
        stats.dropped_overlong += 1
        return None
    stats.truncated += 1
    return prompt[-max_p:], completion[: max(max_c, 1)]


def check_some_kept(kept: list, stats: DataStats, cfg: DataConfig, max_length: int) -> None:
    """A UserError naming the data file when ``data.overlong=drop`` dropped every row (rather than a
    later "0 training rows are fewer than one batch" that names no file and no cause)."""
    if not kept and stats.dropped_overlong:
        raise UserError(
            f"{cfg.path}: all {stats.dropped_overlong} rows are longer than model.max_length={max_length} (or "
            f"data.max_prompt_length={cfg.max_prompt_length} / data.max_completion_length="
            f"{cfg.max_completion_length}) allow, and data.overlong=drop dropped every one; raise the limits or "
            f"use data.overlong=truncate")


@dataclass
class Example:
    """One tokenized training row. For causal models ``input_ids = prompt + completion``."""

    prompt_ids: list[int]
    completion_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def tokenize_pairs(pairs: list[tuple[str, str]], tokenizer, cfg: DataConfig, max_length: int, is_seq2seq: bool,
                   stats: DataStats) -> list[Example]:
    out = []
    for prompt, completion in pairs:
        fitted = fit_lengths(encode_prompt(tokenizer, prompt, is_seq2seq),
                             encode_completion(tokenizer, completion, is_seq2seq), cfg, max_length, stats, is_seq2seq)
        if fitted is not None:
            out.append(Example(*fitted))
    if stats.truncated or stats.dropped_overlong:
        logger.info(f"over-long rows: {stats.truncated} truncated, {stats.dropped_overlong} dropped (data.overlong)")
    check_some_kept(out, stats, cfg, max_length)
    return out


# ---------------------------------------------------------------------------------------------
# Collation: one batch layout for every recipe
# ---------------------------------------------------------------------------------------------


def collate(examples: list[Example], pad_id: int, is_seq2seq: bool) -> dict[str, torch.Tensor]:
    """Pad a list of examples into tensors.

    causal: ``input_ids`` / ``attention_mask`` (B, T), prompt left-padded and completion
    right-padded, so every row's completion starts at the same column ``prompt_len`` (what
    generation produces too); ``labels`` (B, T) hold the completion ids and -100 elsewhere.
    seq2seq: encoder ``input_ids`` / ``attention_mask`` (B, S) right-padded; ``labels`` (B, T)
    right-padded with -100 and ``decoder_attention_mask`` (B, T).
    """
    if is_seq2seq:
        S = max(len(e.prompt_ids) for e in examples)
        T = max(len(e.completion_ids) for e in examples)
        ids = torch.full((len(examples), S), pad_id, dtype=torch.long)
        att = torch.zeros((len(examples), S), dtype=torch.long)
        labels = torch.full((len(examples), T), -100, dtype=torch.long)
        dec_att = torch.zeros((len(examples), T), dtype=torch.long)
        for b, e in enumerate(examples):
            ids[b, : len(e.prompt_ids)] = torch.tensor(e.prompt_ids)
            att[b, : len(e.prompt_ids)] = 1
            labels[b, : len(e.completion_ids)] = torch.tensor(e.completion_ids)
            dec_att[b, : len(e.completion_ids)] = 1
        return {"input_ids": ids, "attention_mask": att, "labels": labels, "decoder_attention_mask": dec_att}
    P = max(len(e.prompt_ids) for e in examples)
    C = max(len(e.completion_ids) for e in examples)
    ids = torch.full((len(examples), P + C), pad_id, dtype=torch.long)  # (B, T)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, e in enumerate(examples):
        p, c = len(e.prompt_ids), len(e.completion_ids)
        ids[b, P - p: P] = torch.tensor(e.prompt_ids)
        ids[b, P: P + c] = torch.tensor(e.completion_ids)
        att[b, P - p: P + c] = 1
        labels[b, P: P + c] = torch.tensor(e.completion_ids)
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def pack(examples: list[Example], block: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Causal packing: first-fit of whole examples into rows of at most ``block`` tokens.

    Each row carries ``position_ids`` that restart at 0 for every example and no attention
    mask, which transformers turns into a block-diagonal causal mask (no attention across
    examples). Returns one single-row dict per packed row; ``collate_packed`` pads them.
    """
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in sorted(examples, key=len, reverse=True):
        n = min(len(e), block)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(e)
                room[r] -= n
                break
        else:
            rows.append([e])
            room.append(block - n)
    packed = []
    for row in rows:
        ids, labels, pos = [], [], []
        for e in row:
            seq = (e.prompt_ids + e.completion_ids)[:block]
            lab = ([-100] * len(e.prompt_ids) + e.completion_ids)[:block]
            ids += seq
            labels += lab
            pos += list(range(len(seq)))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return packed


def collate_packed(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        # padding continues the position count as one more "document" that nothing attends to
        pos[b, :n] = torch.tensor(r["position_ids"])
        pos[b, n:] = torch.arange(T - n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "n_real_tokens": torch.tensor(
        sum(len(r["input_ids"]) for r in rows))}


# ---------------------------------------------------------------------------------------------
# Batch order: a pure function of (seed, step), so resuming at step N needs no saved iterator
# ---------------------------------------------------------------------------------------------


class StepBatcher:
    """Indices of the micro-batches of every optimizer step.

    One epoch is a seeded permutation of the rows; with ``group_by_length`` the permutation is
    cut into mega-batches of 50 micro-batches, each sorted by length (as transformers'
    LengthGroupedSampler), so micro-batches hold rows of similar length, and the micro-batch
    order is shuffled again. Across ``world_size`` processes each global micro-batch of
    ``batch_size * world_size`` rows is cut into contiguous per-process slices.
    """

    def __init__(self, lengths: list[int], batch_size: int, grad_accum: int, seed: int,
                 group_by_length: bool = True, world_size: int = 1, rank: int = 0):
        self.lengths = lengths
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.group = group_by_length
        self.world_size = world_size
        self.rank = rank
        self.global_mb = batch_size * world_size
        if len(lengths) < self.global_mb:
            raise UserError(
                f"{len(lengths)} training rows are fewer than one batch ({batch_size} x {world_size} processes)")
        self.micro_per_epoch = len(lengths) // self.global_mb
        self._cache: dict[int, list[list[int]]] = {}

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.micro_per_epoch // self.grad_accum)

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            order = list(range(len(self.lengths)))
            rng.shuffle(order)
            order = order[: self.micro_per_epoch * self.global_mb]
            if self.group:
                mega = self.global_mb * 50
                chunks = [sorted(order[i: i + mega], key=lambda j: -self.lengths[j]) for i in range(0, len(order), mega)]
                order = [j for c in chunks for j in c]
            mbs = [order[i: i + self.global_mb] for i in range(0, len(order), self.global_mb)]
            if self.group:
                rng.shuffle(mbs)
            self._cache = {epoch: mbs}
        return self._cache[epoch]

    def step(self, step: int) -> list[list[int]]:
        """This process's row indices for each micro-batch of optimizer step ``step``."""
        out = []
        for k in range(self.grad_accum):
            g = step * self.grad_accum + k
            epoch, j = divmod(g, self.steps_per_epoch * self.grad_accum)
            mb = self._epoch(epoch)[j]
            out.append(mb[self.rank * self.batch_size: (self.rank + 1) * self.batch_size])
        return out


def iter_chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def resolve_path(path: str) -> str:
    """Expand ``~`` and environment variables in a data path."""
    return os.path.expandvars(os.path.expanduser(path))


# ---------------------------------------------------------------------------------------------
# Preference pairs: one concatenated batch (chosen rows first, then rejected rows)
# ---------------------------------------------------------------------------------------------


@dataclass
class PairExample:
    """One tokenized preference pair sharing its prompt."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def tokenize_preferences(triples: list[tuple[str, str, str]], tokenizer, cfg: DataConfig, max_length: int,
                         is_seq2seq: bool, stats: DataStats) -> list[PairExample]:
    """Tokenize (prompt, chosen, rejected); the over-long policy applies to the longer side."""
    out = []
    for prompt, chosen, rejected in triples:
        p = encode_prompt(tokenizer, prompt, is_seq2seq)
        c = encode_completion(tokenizer, chosen, is_seq2seq)
        r = encode_completion(tokenizer, rejected, is_seq2seq)
        longer = c if len(c) >= len(r) else r
        fitted = fit_lengths(p, longer, cfg, max_length, stats, is_seq2seq)
        if fitted is None:
            continue
        p2, kept = fitted
        out.append(PairExample(p2, c[: len(kept)], r[: len(kept)]))
    if stats.truncated or stats.dropped_overlong:
        logger.info(f"over-long pairs: {stats.truncated} truncated, {stats.dropped_overlong} dropped (data.overlong)")
    check_some_kept(out, stats, cfg, max_length)
    return out


def collate_preferences(pairs: list[PairExample], pad_id: int, is_seq2seq: bool) -> dict[str, torch.Tensor]:
    """Rows 0..B-1 are the chosen completions, rows B..2B-1 the rejected ones (one forward)."""
    examples = [Example(p.prompt_ids, p.chosen_ids) for p in pairs] + [Example(p.prompt_ids, p.rejected_ids) for p in pairs]
    return collate(examples, pad_id, is_seq2seq)
