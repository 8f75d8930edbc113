"""Experiment trackers (``train.report_to``), offline: every metrics.jsonl line reaches TensorBoard,
W&B (offline mode), trackio (its local store) and MLflow (its file store) at the same step, the
resolved config is logged once, and evaluation sample tables reach W&B as a table.

The runs go through the CLI in a subprocess: trackio reads its store folder when it is imported."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import sft_rows, write_jsonl
from rlhfkit.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TRACKERS = ["tensorboard", "wandb", "trackio", "mlflow"]
installed = [t for t in TRACKERS if importlib.util.find_spec(t) is not None]
needs = {t: pytest.mark.skipif(t not in installed, reason=f"{t} not installed (pip install 'rlhfkit[{t}]')")
         for t in TRACKERS}


def run_cli(command: str, cfg: dict, tmp_path: Path) -> Path:
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio"),
           "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "rlhfkit.cli", command, "--config", str(tmp_path / "cfg.yaml")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return Path(cfg["train"]["output_dir"])


def metrics_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def wandb_records(out: Path):
    """The protobuf records of an offline W&B run (``run-*.wandb``: a ``:W&B`` header, then
    LevelDB-log blocks of 32 KiB holding full/first/middle/last record fragments)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, pos, buf = Path(path).read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def wandb_history(out: Path) -> dict[int, dict]:
    rows = {}
    for r in wandb_records(out):
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows[row["_step"]] = row
    return rows


# --------------------------------------------------------------------------------------------
# unit
# --------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_tracker_not_installed_is_one_line_naming_the_package(monkeypatch):
    from rlhfkit.recipes import sft

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        load_config(sft.Config, None, ["train.report_to=[wandb]"])
    assert str(e.value) == "train.report_to: wandb is not installed; pip install 'rlhfkit[wandb]'"
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(sft.Config, None, ["train.report_to=[tensorbord]"])


@pytest.mark.unit
def test_flat_config_has_dotted_plain_values():
    from rlhfkit.recipes import sft
    from rlhfkit.trackers import flat_config

    cfg = load_config(sft.Config, None, ["train.lr=2e-4", "data.columns={completion: summary}"])
    flat = flat_config(cfg)
    assert flat["train.lr"] == 2e-4 and flat["data.columns.completion"] == "summary"
    assert flat["train.report_to"] == "[]" and flat["train.epochs"] == "null"  # lists and None as JSON text
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tiny_llama, tmp_path_factory):
    """4 SFT steps, held-out loss at steps 0, 2 and 4, logged to every installed tracker."""
    if not installed:
        pytest.skip("no tracker installed (pip install 'rlhfkit[trackers]')")
    tmp = tmp_path_factory.mktemp("trackers")
    data = write_jsonl(tmp / "d.jsonl", sft_rows(120))
    cfg = {"model": {"name_or_path": tiny_llama, "max_length": 128},
           "data": {"path": data, "columns": {"completion": "summary"}, "chat_template": "false",
                    "prompt_template": "Summarize: {dialogue}\nSummary:", "eval_fraction": 0.1},
           "train": {"output_dir": str(tmp / "run"), "max_steps": 4, "batch_size": 8, "lr": 3e-3,
                     "progress": False, "report_to": installed, "run_name": "myrun", "project": "proj"},
           "eval": {"every": 2}}
    out = run_cli("sft", cfg, tmp)
    lines = metrics_lines(out)
    assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3, 4]
    assert [l["step"] for l in lines if "eval/loss" in l] == [0, 2, 4]
    return tmp, out, lines


def series(lines: list[dict], key: str) -> list[tuple[int, float]]:
    return [(l["step"], l[key]) for l in lines if key in l]


@needs["tensorboard"]
@pytest.mark.trackers
def test_tensorboard_events_equal_metrics_jsonl(sft_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, lines = sft_run
    ea = EventAccumulator(str(out / "tensorboard" / "proj"))
    ea.Reload()
    for key in ("loss", "eval/loss", "grad_norm", "tokens_per_second"):
        got = [(e.step, e.value) for e in ea.Scalars(key)]
        want = series(lines, key)
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key  # stored as float32
    assert list((out / "tensorboard" / "proj").glob("*/hparams.yml"))  # the config, once


@needs["wandb"]
@pytest.mark.trackers
def test_wandb_offline_run_holds_the_metrics_and_config(sft_run):
    _, out, lines = sft_run
    rows = wandb_history(out)
    for key in ("loss", "eval/loss", "lr", "tokens"):
        assert [(s, rows[s][key]) for s in sorted(rows) if key in rows[s]] == series(lines, key), key
    configs = [r.config for r in wandb_records(out) if r.WhichOneof("record_type") == "config"]
    assert len(configs) == 1
    values = {i.key: json.loads(i.value_json) for i in configs[0].update}
    assert values["train.lr"] == 3e-3 and values["train.project"] == "proj"
    runs = [r.run for r in wandb_records(out) if r.WhichOneof("record_type") == "run"]
    assert runs[0].display_name == "myrun" and runs[0].project == "proj"


@needs["trackio"]
@pytest.mark.trackers
def test_trackio_local_store_holds_the_metrics(sft_run):
    tmp, _, lines = sft_run
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps(S.get_logs('proj', 'myrun')))")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRACKIO_DIR": str(tmp / "trackio")},
                       capture_output=True, text=True, timeout=120)
    logs = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("loss", "eval/loss"):
        assert [(l["step"], l[key]) for l in logs if l.get(key) is not None] == series(lines, key), key


@needs["mlflow"]
@pytest.mark.trackers
def test_mlflow_file_store_holds_the_metrics_and_params(sft_run):
    from mlflow.tracking import MlflowClient

    tmp, _, lines = sft_run
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{tmp / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    assert run.info.run_name == "myrun"
    for key in ("loss", "eval/loss"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert got == series(lines, key), key
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model.load_in_4bit"] == "False"


@needs["wandb"]
@pytest.mark.trackers
def test_grpo_eval_samples_reach_wandb_as_a_table(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(60))
    cfg = {"model": {"name_or_path": tiny_llama, "max_length": 128},
           "data": {"path": data, "chat_template": "false", "prompt_template": "Summarize: {dialogue}\nSummary:",
                    "eval_fraction": 0.1},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 8, "progress": False,
                     "report_to": ["wandb"]},
           "generation": {"max_new_tokens": 4}, "prompts_per_step": 2,
           "rewards": [{"kind": "python", "function": "test_grpo:letter_a"}]}
    out = run_cli("grpo", cfg, tmp_path)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    rows = wandb_history(out)
    prefix = "eval/samples/"
    cell = {k[len(prefix):]: v for k, v in rows[2].items() if k.startswith(prefix)}  # logged at the last step
    assert cell["_type"] == "table-file" and cell["nrows"] == len(samples) > 0
    (path,) = glob.glob(str(out / "wandb" / "offline-run-*" / "files" / cell["path"]))
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["prompt", "before", "after", "reward_before", "reward_after"]
    assert [r[0] for r in table["data"]] == [s["prompt"] for s in samples]
    assert [r[2] for r in table["data"]] == [s["completions"]["after"] for s in samples]


@needs["tensorboard"]
@needs["wandb"]
@pytest.mark.trackers
def test_only_the_main_process_logs(tiny_llama, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(40))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29547", str(ROOT / "tests" / "scripts" / "ddp_trackers.py"), tiny_llama,
                        data, str(tmp_path / "run")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run"
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    assert len(list((out / "tensorboard" / "rlhfkit").glob("events.out.tfevents.*"))) == 1  # one writer
    ea = EventAccumulator(str(out / "tensorboard" / "rlhfkit"))
    ea.Reload()
    want = series(metrics_lines(out), "loss")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in ea.Scalars("loss")] == want
    assert len(glob.glob(str(out / "wandb" / "offline-run-*"))) == 1  # one W&B run
