"""Bad input is one ``error: FILE: ...`` line and exit status 2, never a traceback.

Every file of ``tests/data/bad/`` goes through every command that reads that kind of data, through
the CLI's ``main`` in-process. The model path of those runs does not exist: the data error must come
first (the data is checked before any model loads). Over-long rows need a tokenizer to count, so that
case runs with the tiny GPT-2 (256 positions).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhfkit import cli

pytestmark = pytest.mark.unit

BAD = Path(__file__).parent / "data" / "bad"
NO_MODEL = "/nonexistent/rlhfkit-test-model"

# file -> (expected fragments of the error line after "error: FILE: ")
READ_ERRORS = {
    "latin1.jsonl": ["row 3: column 27: not UTF-8 text (byte 0xe9)"],
    "latin1.json": ["line 17: column 17: not UTF-8 text (byte 0xe9)"],
    "latin1.csv": ["row 3: column 15: not UTF-8 text (byte 0xe9)"],
    "truncated.jsonl": ["row 4: column 41: malformed JSON: the line ends before its object does", "truncated?"],
    "not_object.jsonl": ["row 2: expected a JSON object, got list"],
    "empty.jsonl": ["no rows"],
    "blank_lines.jsonl": ["no rows"],
    "empty.csv": ["no rows"],
    "header_only.csv": ["no rows"],
    "empty.json": ["no rows"],
    "empty_file.json": ["no rows"],
    "stray_quote.csv": ["row 2: column 1: this quote is never closed"],
    "quote_after_text.csv": ["row 2: column 28: stray quote inside an unquoted field"],
    "inner_quote.csv": ["row 2: column 12: stray quote inside an unquoted field"],
    "shifted_columns.csv": ["row 3: 6 fields, the header has 5"],
    "missing_fields.csv": ["row 2: 2 fields, the header has 5"],
}
COMMANDS = ["sft", "reward", "dpo", "kto", "ppo", "grpo", "prefs", "eval", "label"]


def argv_for(command: str, data: Path, model: str, out: Path) -> list[str]:
    """The shortest command line of ``command`` reading ``data`` with ``model``."""
    if command == "label":
        return ["label", f"path={data}", f"db={out / 'label.db'}"]
    if command == "eval":
        return ["eval", f"models=[{{name: m, model: {{name_or_path: '{model}'}}}}]", f"data.path={data}",
                "rewards=[{kind: length}]", f"output_dir={out}"]
    args = [command, f"model.name_or_path={model}", f"data.path={data}"]
    if command in ("grpo", "prefs"):
        args.append("rewards=[{kind: length}]")
    if command == "prefs":
        args += [f"output={out / 'prefs.jsonl'}", f"output_dir={out}"]
    else:
        args.append(f"train.output_dir={out}")
    return args


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    import logging
    import sys

    for h in logging.getLogger("transformers").handlers:  # bound to an earlier test's (closed) capture
        if isinstance(h, logging.StreamHandler):
            h.stream, h.flush = sys.stderr, sys.stderr.flush
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [l for l in err.splitlines() if l.strip() and not l.startswith(("[rlhfkit]", "[transformers]"))]


@pytest.fixture
def no_serving(monkeypatch):
    """``rlhfkit label`` must fail on the file, never start serving it."""
    import rlhfkit.apps.label as label

    def refuse(*a, **k):
        raise AssertionError("label served a bad file")

    monkeypatch.setattr(label, "serve", refuse)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", sorted(READ_ERRORS))
def test_bad_file_is_one_error_line_before_any_model_loads(name, command, tmp_path, capsys, no_serving):
    data = BAD / name
    code, lines = run_cli(argv_for(command, data, NO_MODEL, tmp_path), capsys)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {data}: "), lines  # the data file, not the (missing) model
    for fragment in READ_ERRORS[name]:
        assert fragment in lines[0], lines


def test_every_bad_file_is_covered():
    assert sorted(p.name for p in BAD.iterdir() if p.name != "all_overlong.jsonl") == sorted(READ_ERRORS)


@pytest.mark.parametrize("command", ["sft", "reward", "dpo", "kto", "grpo"])
def test_all_rows_overlong_names_the_file_and_the_cause(command, tiny_gpt2, tmp_path, capsys):
    data = BAD / "all_overlong.jsonl"
    argv = argv_for(command, data, tiny_gpt2, tmp_path) + ["data.overlong=drop", "model.max_length=32"]
    if command != "reward":  # reward scores whole texts: only model.max_length bounds them
        argv += ["data.max_prompt_length=8", "data.max_completion_length=8"]
    if command == "grpo":
        argv += ["generation.max_new_tokens=8"]
    code, lines = run_cli(argv, capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"error: {data}: all "), lines
    assert "data.overlong=drop dropped every one" in lines[0]


# ---------------------------------------------------------------------------------------------
# models and the command line
# ---------------------------------------------------------------------------------------------


def _good_data(tmp_path) -> Path:
    from helpers import sft_rows, write_jsonl

    return Path(write_jsonl(tmp_path / "d.jsonl", [{"prompt": r["dialogue"], "completion": r["summary"]}
                                                   for r in sft_rows(12)]))


@pytest.mark.parametrize("model", ["/no/such/folder", "./no_such_folder", "runs_that_do_not_exist/a/b"])
def test_missing_local_model_path_says_not_found(model, tmp_path, capsys):
    code, lines = run_cli(["sft", f"model.name_or_path={model}", f"data.path={_good_data(tmp_path)}",
                           f"train.output_dir={tmp_path / 'o'}"], capsys)
    assert code == 2 and lines == [f"error: {model}: model folder not found"]


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_safetensors_is_one_error_line(damage, tiny_gpt2, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2, model)
    weights = model / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 3] if damage == "truncated" else os.urandom(len(blob)))
    code, lines = run_cli(["sft", f"model.name_or_path={model}", f"data.path={_good_data(tmp_path)}",
                           f"train.output_dir={tmp_path / 'o'}"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {model}: weights file is damaged or not safetensors"), lines


@pytest.mark.parametrize("override, message", [
    ("trian.lr=0.1", "error: override 'trian.lr=0.1': unknown key 'trian'; did you mean 'train'?"),
    ("train.lrr=0.1", "error: override 'train.lrr=0.1': unknown key 'train.lrr'; did you mean 'train.lr'?"),
    ("train.lr=fast", "error: override 'train.lr=fast': 'train.lr' expects float, got 'fast'"),
])
def test_override_typo_is_blamed_on_the_override(override, message, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name_or_path: x\ntrain:\n  lr: 0.001\n")
    code, lines = run_cli(["sft", "--config", str(cfg), override], capsys)
    assert code == 2 and lines == [message]
    # the file's own mistakes are still the file's
    cfg.write_text("trian:\n  lr: 0.001\n")
    code, lines = run_cli(["sft", "--config", str(cfg), "train.lr=0.1"], capsys)
    assert code == 2 and lines == [f"error: {cfg}: unknown key 'trian'; did you mean 'train'?"]


@pytest.mark.parametrize("value", [1, 8, 15])
def test_max_length_below_the_minimum_is_refused(value, tmp_path, capsys):
    code, lines = run_cli(["sft", f"model.max_length={value}", f"data.path={_good_data(tmp_path)}"], capsys)
    assert code == 2 and lines == [
        f"error: model.max_length must be at least 16 tokens (a prompt and a completion must both fit), got {value}"]


def test_max_length_above_the_position_limit_is_lowered_with_a_logged_line(tiny_gpt2, tmp_path, capsys):
    """The tiny GPT-2 has 256 positions. Rows of ~400 tokens with model.max_length=512 used to be cut
    to 512 and crash in the position embedding (IndexError); now they are cut to 256."""
    from helpers import write_jsonl

    long = " ".join(["the cat sat on the mat"] * 70)  # ~420 tokens
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": f"{long} {i}", "completion": f"cat {i}."} for i in range(8)])
    code = cli.main(["sft", f"model.name_or_path={tiny_gpt2}", f"data.path={data}", "model.max_length=512",
                     "data.max_prompt_length=1000", "train.max_steps=1", "train.batch_size=2", "train.progress=false",
                     f"train.output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"model.max_length=512 is above {tiny_gpt2}'s 256 positions: rows are cut to 256 tokens" in err
    import yaml

    assert yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())["model"]["max_length"] == 256
