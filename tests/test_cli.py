"""The command line: flag-style overrides, --version, env, help text as YAML, view/label options."""
from __future__ import annotations

import json

import pytest
import yaml

from rlhfkit import cli
from rlhfkit.config import show_default

pytestmark = pytest.mark.unit


def test_flag_style_overrides_equal_key_value():
    argv = ["--config", "a.yaml", "--train.lr=1e-4", "--data.max-rows", "64", "--resume", "lora.enabled=true",
            "--lora.r", "-1", "--packing", "--debug"]
    path, overrides, flags = cli.parse_args(argv)
    assert path == "a.yaml"
    assert overrides == ["train.lr=1e-4", "data.max_rows=64", "lora.enabled=true", "lora.r=-1", "packing=true"]
    assert flags == {"resume": True, "debug": True, "help": False}
    # a bare switch before another option is true too; --help keeps its meaning
    assert cli.parse_args(["--lora.enabled", "--help"]) == (None, ["lora.enabled=true"], {
        "resume": False, "debug": False, "help": True})
    assert cli.parse_args(["--my-sft.train.max-steps", "3"])[1] == ["my-sft.train.max_steps=3"]  # a stage name
    with pytest.raises(cli.UserError, match="unexpected argument 'runs/a'"):
        cli.parse_args(["runs/a"])
    dirs: list[str] = []
    assert cli.parse_args(["runs/a", "--port", "9", "runs/b"], positional=dirs)[1] == ["port=9"]
    assert dirs == ["runs/a", "runs/b"]


def test_flag_overrides_reach_the_config(tmp_path, monkeypatch, capsys):
    """``--key value`` and ``key=value`` load the same config through the real command."""
    from rlhfkit.recipes import sft

    seen = []
    monkeypatch.setattr(sft, "run", lambda cfg, resume=False: seen.append((cfg, resume)) or {})
    assert cli.main(["sft", "--train.lr", "0.003", "--data.path=x.jsonl", "--train.max-steps", "7",
                     "--lora.enabled", "--resume"]) == 0
    cfg, resume = seen[0]
    assert (cfg.train.lr, cfg.data.path, cfg.train.max_steps, cfg.lora.enabled, resume) == (
        0.003, "x.jsonl", 7, True, True)
    assert cli.main(["sft", "--train.lr", "fast"]) == 2
    assert "'train.lr' expects float, got 'fast'" in capsys.readouterr().err
    assert cli.main(["sft", "--trian.lr=1"]) == 2
    assert "unknown key 'trian'" in capsys.readouterr().err


def test_version_and_env(capsys):
    from rlhfkit import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"rlhfkit {__version__}"
    assert cli.main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    import peft
    import torch
    import transformers

    assert info["rlhfkit"] == __version__
    assert info["core"]["torch"] == torch.__version__
    assert info["core"]["transformers"] == transformers.__version__
    assert info["core"]["peft"] == peft.__version__
    assert info["device"]["cuda"] == torch.cuda.device_count()
    assert set(info["optional"]) >= {"vllm", "deepspeed", "bitsandbytes", "psycopg"}
    import importlib.util

    assert info["assets"]["profanity_check"]["found"] == (importlib.util.find_spec("profanity_check") is not None)
    assert cli.main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"torch         {torch.__version__}" in text and "offline assets" in text
    assert cli.main(["env", "--bogus"]) == 2


def test_help_shows_defaults_as_yaml(capsys):
    assert show_default(None) == "null" and show_default(True) == "true" and show_default(1e-05) == "1e-05"
    assert show_default({"prompt": "prompt"}) == "{prompt: prompt}"
    assert show_default("a: b") == "'a: b'"  # quoted where YAML needs it: the shown text reads back
    assert cli.main(["ppo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "RewardConfig(" not in out
    lines = out.split("  rewards =\n", 1)[1].splitlines()
    block = "\n".join(line for line in lines[:next(i for i, x in enumerate(lines) if not x.startswith(("      -", "        ")))])
    rewards = yaml.safe_load(block)  # the default list of reward sections, as a YAML block
    assert rewards[0]["kind"] == "toxicity" and rewards[0]["backend"] == "profanity_check"
    assert "  rewards[].kind = toxicity" in out  # and every key of one list item


def test_run_help_documents_stages_and_interpolation(capsys):
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "${name.output_dir}" in out and "${sft.output_dir}" in out
    for key in ("name", "command", "file", "config"):
        assert f"  stages[].{key} = " in out


def test_label_and_view_take_the_same_option_forms(tmp_path):
    from rlhfkit.apps.view import parse_view_args

    for argv in (["--port", "9001"], ["--port=9001"], ["port=9001"]):
        cfg, _ = parse_view_args([str(tmp_path), *argv])
        assert (cfg.port, cfg.runs) == (9001, [str(tmp_path)])
        _, overrides, _ = cli.parse_args(argv)
        from rlhfkit.apps.label import LabelConfig
        from rlhfkit.config import load_config

        assert load_config(LabelConfig, None, overrides).port == 9001


def test_demo_and_run_take_flag_overrides(tmp_path, monkeypatch):
    from rlhfkit.recipes import demo, pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run", lambda cfg, resume=False, overrides=(): seen.append((cfg, resume, overrides)) or {})
    monkeypatch.setattr(demo, "write_report", lambda out, quick, seconds=None: {"toxicity_mean_before": 1, "toxicity_mean_after": 0,
                                                                  "mean_improvement_pct": 100})
    assert cli.main(["demo", "--ppo.train.lr", "0.001", f"--output_dir={tmp_path / 'd'}", "--resume"]) == 0
    cfg, resume, overrides = seen[-1]
    assert cfg.output_dir == str(tmp_path / "d") and resume is True
    assert overrides[-1] == "ppo.train.lr=0.001"
    assert cli.main(["demo", "--config", "x.yaml"]) == 2
    (tmp_path / "p.yaml").write_text("stages: [{name: s, command: sft}]\n")
    assert cli.main(["run", str(tmp_path / "p.yaml"), "--s.train.lr", "0.5"]) == 0
    assert seen[-1][2] == ["s.train.lr=0.5"]
