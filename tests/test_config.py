"""Config loading: YAML + dotted overrides -> typed dataclasses, errors that name the key, docs, CLI."""
from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rlhfkit.config as C
from rlhfkit import cli
from rlhfkit.config import (ConfigError, DataConfig, GenerationConfig, LoraConfig, TrainConfig, UserError,
                            field_docs, load_config, save_config)
from rlhfkit.recipes import sft

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------------------------------------
# typed conversion
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_overrides_convert_to_field_types():
    cfg = load_config(sft.Config, None, [
        "train.lr=1e-4",                 # YAML 1.1 reads this as the string "1e-4"
        "train.batch_size=4",
        "train.epochs=2.0",              # Optional[int]: a whole float becomes an int
        "train.max_grad_norm=null",      # Optional[float] -> None
        "train.cpu=true",
        "train.progress=no",
        "train.adam_betas=[0.8, 0.95]",
        "lora.target_modules=q_proj",    # a scalar for a list field becomes a one-item list
        "data.columns={prompt: dialogue, completion: summary}",
        "model.name_or_path=some/model",
        "packing=True",
    ])
    assert cfg.train.lr == 1e-4 and type(cfg.train.lr) is float
    assert cfg.train.batch_size == 4 and type(cfg.train.batch_size) is int
    assert cfg.train.epochs == 2 and type(cfg.train.epochs) is int
    assert cfg.train.max_grad_norm is None
    assert cfg.train.cpu is True and cfg.train.progress is False
    assert cfg.train.adam_betas == [0.8, 0.95] and all(type(b) is float for b in cfg.train.adam_betas)
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.data.columns == {"prompt": "dialogue", "completion": "summary"}
    assert cfg.model.name_or_path == "some/model"
    assert cfg.packing is True


@pytest.mark.unit
@pytest.mark.parametrize("text,expected", [("true", True), ("false", False), ("yes", True), ("no", False),
                                           ("'1'", True), ("'0'", False), ("'True'", True), ("'FALSE'", False)])
def test_bool_strings(text, expected):
    assert load_config(TrainConfig, None, [f"cpu={text}"]).cpu is expected


@pytest.mark.unit
def test_yaml_file_then_overrides_win(tmp_path):
    p = write(tmp_path, """
model:
  name_or_path: tiny/model
  max_length: 256
train:
  lr: 3e-5
  adam_betas: [0.9, 0.98]
  epochs: null
  max_grad_norm: 0.5
  cpu: "false"
data:
  path: rows.jsonl
  prompt_template: "Summarize the following conversation.\\n\\n{dialogue}\\n\\nSummary:"
lora:
  enabled: true
  target_modules: [q_proj, v_proj]
""")
    cfg = load_config(sft.Config, p, ["train.lr=2e-4", "model.max_length=128"])
    assert cfg.train.lr == 2e-4  # override beats the file
    assert cfg.model.max_length == 128
    assert cfg.model.name_or_path == "tiny/model"
    assert cfg.train.adam_betas == [0.9, 0.98]
    assert cfg.train.epochs is None and cfg.train.max_grad_norm == 0.5 and cfg.train.cpu is False
    assert cfg.data.prompt_template == "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"
    assert cfg.lora.enabled is True and cfg.lora.target_modules == ["q_proj", "v_proj"]
    # untouched keys keep their defaults
    assert cfg.train.batch_size == TrainConfig().batch_size
    assert cfg.data.overlong == "truncate"


@pytest.mark.unit
def test_chat_template_true_override_is_the_string_true():
    # YAML parses `true` as a bool; the field is a str choice ("auto" / "true" / "false")
    assert load_config(DataConfig, None, ["chat_template=true"]).chat_template == "true"
    assert load_config(DataConfig, None, ["chat_template=false"]).chat_template == "false"


@pytest.mark.unit
@pytest.mark.parametrize("text,expected", [
    ("Question: {question}\\nAnswer:", "Question: {question}\\nAnswer:"),  # ':' would make a YAML mapping
    ("Summary:", "Summary:"),
    ("{post} TL;DR:", "{post} TL;DR:"),                                 # '{' would start a YAML flow map
    ("{dialogue}", "{dialogue}"),
    ("#1 {post}", "#1 {post}"),                                         # '#' would start a YAML comment
    ("- {post}", "- {post}"),                                           # '- ' would make a YAML list
    ('"Summarize:\\n\\n{dialogue}\\n\\nSummary:"', "Summarize:\n\n{dialogue}\n\nSummary:"),  # YAML-quoted: escapes
    ("null", None),                                                     # Optional[str]
])
def test_text_overrides_are_taken_verbatim(text, expected):
    assert load_config(DataConfig, None, [f"prompt_template={text}"]).prompt_template == expected


@pytest.mark.unit
def test_unparsable_override_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"override 'train.adam_betas': cannot parse value '\[0.9,'"):
        load_config(sft.Config, None, ["train.adam_betas=[0.9,"])
    with pytest.raises(ConfigError, match=r"'train.max_grad_norm' expects float or None, got 'abc'"):
        load_config(sft.Config, None, ["train.max_grad_norm=abc"])


@pytest.mark.unit
def test_recipe_section_default_survives_partial_section(tmp_path):
    # sft.Config gives its DataConfig its own default columns: setting data.path must not reset them
    assert sft.Config().data.columns == {"prompt": "prompt", "completion": "completion"}
    cfg = load_config(sft.Config, write(tmp_path, "data:\n  path: rows.jsonl\n"), ["data.max_rows=5"])
    assert cfg.data.path == "rows.jsonl" and cfg.data.max_rows == 5
    assert cfg.data.columns == {"prompt": "prompt", "completion": "completion"}


@pytest.mark.unit
def test_make_config_merges_sections_from_config_and_overrides(tmp_path):
    """The Python API's config: dotted keys, then overrides; a section given as a dict merges into
    the section (keys set earlier survive) instead of replacing it."""
    cfg = C.make_config(sft.Config, {"train.lr": 1e-4, "train": {"batch_size": 3}}, train={"max_steps": 7},
                        data__max_prompt_length=11)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.max_steps) == (1e-4, 3, 7)
    assert cfg.data.max_prompt_length == 11
    assert cfg.train.seed == TrainConfig().seed  # untouched keys keep their defaults
    # a dict-valued field (not a section) is replaced, not merged
    cfg = C.make_config(sft.Config, data={"columns": {"prompt": "post"}})
    assert cfg.data.columns == {"prompt": "post"}
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 0.5, batch_size: 2}\n")
    cfg = C.make_config(sft.Config, str(path), train={"batch_size": 5})
    assert (cfg.train.lr, cfg.train.batch_size) == (0.5, 5)
    with pytest.raises(UserError, match=r"f\(\): config must be a Config, a YAML path or a dict, got int"):
        C.make_config(sft.Config, 3, source="f()")
    with pytest.raises(ConfigError, match="trian"):
        C.make_config(sft.Config, {"trian.lr": 1.0})


@pytest.mark.unit
def test_save_config_round_trip(tmp_path):
    cfg = load_config(sft.Config, None, ["train.lr=1e-4", "lora.enabled=true", "data.columns={prompt: post}"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(sft.Config, tmp_path / "config.yaml") == cfg


# ---------------------------------------------------------------------------------------------
# errors name the key
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr'; did you mean 'train\.lr'\?"):
        load_config(sft.Config, None, ["train.lrr=1e-4"])
    p = write(tmp_path, "modle:\n  name_or_path: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(sft.Config, p)
    assert str(p) in str(e.value) and "unknown key 'modle'" in str(e.value) and "did you mean 'model'" in str(e.value)


@pytest.mark.unit
def test_unknown_key_without_a_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(LoraConfig, None, ["zzzzzz=1"])
    msg = str(e.value)
    assert "unknown key 'zzzzzz'" in msg and "valid keys:" in msg
    assert all(f.name in msg for f in dataclasses.fields(LoraConfig))


@pytest.mark.unit
@pytest.mark.parametrize("override,key", [
    ("train.batch_size=abc", "train.batch_size"),
    ("train.batch_size=2.5", "train.batch_size"),
    ("train.lr=fast", "train.lr"),
    ("train.cpu=maybe", "train.cpu"),
    ("train.lr=true", "train.lr"),
    ("train.adam_betas=[0.9, x]", "train.adam_betas[1]"),
    ("data.columns=[a, b]", "data.columns"),
    ("model.max_length=[1]", "model.max_length"),
    ("model=3", "model"),
])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(sft.Config, None, [override])
    assert f"'{key}'" in str(e.value)


@pytest.mark.unit
def test_wrong_type_in_yaml_names_file_and_key(tmp_path):
    p = write(tmp_path, "model:\n  name_or_path: [a, b]\n")
    with pytest.raises(ConfigError) as e:
        load_config(sft.Config, p)
    assert str(e.value) == f"{p}: 'model.name_or_path' expects str, got ['a', 'b']"


@pytest.mark.unit
@pytest.mark.parametrize("overrides,needle", [
    (["lora.adapter_path=runs/a"], "lora.adapter_path is set but lora.enabled is false"),
    (["train.precision=bf16", "train.cpu=true"], "train.precision=bf16 conflicts with train.cpu=true"),
    (["train.precision=fp16", "train.cpu=true"], "train.precision=fp16 conflicts with train.cpu=true"),
    (["train.adam_betas=[0.9]"], "train.adam_betas needs two numbers"),
    (["train.lr=0"], "train.lr must be > 0"),
    (["train.batch_size=0"], "train.batch_size must be > 0"),
    (["data.eval_fraction=1.0"], "data.eval_fraction must be in [0, 1)"),
    (["data.overlong=trunc"], "did you mean 'truncate'"),
    (["data.chat_template=yes please"], "'data.chat_template' must be one of"),
    (["train.scheduler=cosin"], "did you mean 'cosine'"),
    (["lora.dropout=1.0"], "lora.dropout must be in [0, 1)"),
])
def test_conflicting_or_invalid_settings_rejected(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(sft.Config, None, overrides)
    assert needle in str(e.value)


@pytest.mark.unit
def test_generation_conflicts_rejected():
    with pytest.raises(ConfigError, match=r"min_new_tokens \(65\) > generation.max_new_tokens \(64\)"):
        load_config(GenerationConfig, None, ["min_new_tokens=65"])
    assert load_config(GenerationConfig, None, ["min_new_tokens=64"]).min_new_tokens == 64  # equal is fine
    with pytest.raises(ConfigError, match="output_length_range"):
        load_config(GenerationConfig, None, ["output_length_range=[8, 4]"])
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        load_config(GenerationConfig, None, ["temperature=0"])
    assert load_config(GenerationConfig, None, ["temperature=0", "do_sample=false"]).temperature == 0.0


@pytest.mark.unit
def test_yaml_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(sft.Config, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"cfg.yaml: line 3 invalid YAML \(mapping values are not allowed here\)"):
        load_config(sft.Config, write(tmp_path, "train:\n  lr: 1\n  bad: x: y\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(sft.Config, write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(sft.Config, None, ["train.lr"])
    with pytest.raises(ConfigError, match="'train.lr' is not a section|'lr' is not a section"):
        load_config(sft.Config, None, ["train.lr=1", "train.lr.x=2"])
    assert load_config(sft.Config, write(tmp_path, "")) == sft.Config()  # empty file: defaults


@pytest.mark.unit
def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)


# ---------------------------------------------------------------------------------------------
# every field is documented
# ---------------------------------------------------------------------------------------------


def _config_dataclasses() -> list[type]:
    found = [obj for _, obj in inspect.getmembers(C, inspect.isclass)
             if dataclasses.is_dataclass(obj) and obj.__module__ == C.__name__]
    return found + [sft.Config]


@pytest.mark.unit
def test_config_module_dataclasses_found():
    names = {c.__name__ for c in _config_dataclasses()}
    assert {"ModelConfig", "LoraConfig", "DataConfig", "TrainConfig", "GenerationConfig", "RewardConfig",
            "Config"} <= names


@pytest.mark.unit
@pytest.mark.parametrize("cls", _config_dataclasses(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if len(docs.get(f.name, "").strip()) < 5]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


@pytest.mark.unit
def test_field_docs_reads_the_string_after_each_field():
    docs = field_docs(TrainConfig)
    assert docs["lr"] == "Peak learning rate (AdamW)."
    assert docs["cpu"] == "Run on the CPU even when a GPU is present."


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "rlhfkit.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.unit
def test_cli_bad_config_exits_2_with_one_error_line(tmp_path):
    bad = write(tmp_path, "train:\n  lrr: 1e-4\n", "bad.yaml")
    r = _run_cli(["sft", "--config", str(bad)], tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:")
    assert "train.lrr" in lines[0] and "did you mean 'train.lr'" in lines[0] and "bad.yaml" in lines[0]
    assert "Traceback" not in r.stderr


@pytest.mark.unit
def test_cli_main_reports_user_errors_with_status_2(tmp_path, capsys):
    assert cli.main(["sft", "train.batch_size=abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "'train.batch_size'" in err[0]
    assert cli.main(["sft", "train.adam_betas=[0.9,"]) == 2  # a YAML syntax error in an override
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: override 'train.adam_betas'")
    assert cli.main(["sfft"]) == 2
    assert "did you mean 'sft'" in capsys.readouterr().err
    assert cli.main(["sft", "--bogus"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err  # --bogus is the switch bogus=true
    assert cli.main(["sft", "--config"]) == 2
    assert "--config needs a file name" in capsys.readouterr().err


@pytest.mark.unit
def test_cli_help_lists_every_key_with_docs(capsys):
    assert cli.main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "  train.lr = 1e-05" in out
    assert "Peak learning rate (AdamW)." in out
    for key in ("model.name_or_path", "lora.enabled", "data.prompt_template", "train.output_dir", "packing"):
        assert f"  {key} = " in out
    # the recipe's own section defaults, not the bare DataConfig's
    assert "  data.columns = {prompt: prompt, completion: completion}" in out


@pytest.mark.unit
def test_parse_args_splits_config_flags_and_overrides():
    path, overrides, flags = cli.parse_args(["--config", "a.yaml", "train.lr=1", "--resume", "data.path=x=y"])
    assert path == "a.yaml"
    assert overrides == ["train.lr=1", "data.path=x=y"]
    assert flags == {"resume": True, "debug": False, "help": False}
    assert cli.parse_args(["--config=b.yaml"])[0] == "b.yaml"
    # the value keeps everything after the first '='
    assert load_config(DataConfig, None, ["path=x=y"]).path == "x=y"


# ---------------------------------------------------------------------------------------------
# renamed keys (RENAMED): old names work for one release with a warning; both names is an error
# ---------------------------------------------------------------------------------------------


class _Lines(list):
    """Messages logged by the ``rlhfkit`` logger (which does not propagate once the CLI set it up)."""

    def __enter__(self):
        import logging

        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.append(record.getMessage())
        logging.getLogger("rlhfkit").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("rlhfkit").removeHandler(self.handler)


@pytest.mark.unit
def test_renamed_keys_map_to_new_names_with_one_warning(tmp_path):
    p = write(tmp_path, "train:\n  eval_every: 7\neval_batch_size: 3\n")
    with _Lines() as lines:
        cfg = load_config(sft.Config, p, ["eval_max_rows=5"])
    assert (cfg.eval.every, cfg.eval.batch_size, cfg.eval.max_rows) == (7, 3, 5)
    assert lines.count("warning: 'train.eval_every' is deprecated, use 'eval.every'") == 1
    assert lines.count("warning: 'eval_batch_size' is deprecated, use 'eval.batch_size'") == 1
    assert lines.count("warning: 'eval_max_rows' is deprecated, use 'eval.max_rows'") == 1
    # the Python API maps them too
    api = C.make_config(sft.Config, {"train": {"eval_every": 4}}, eval_batch_size=2)
    assert (api.eval.every, api.eval.batch_size) == (4, 2)


@pytest.mark.unit
@pytest.mark.parametrize("text,overrides", [("train:\n  eval_every: 7\neval:\n  every: 3\n", []),
                                            ("eval:\n  batch_size: 3\n", ["eval_batch_size=4"])])
def test_old_and_new_name_together_is_an_error(tmp_path, text, overrides):
    with pytest.raises(ConfigError, match="deprecated"):
        load_config(sft.Config, write(tmp_path, text), overrides)
    with pytest.raises(ConfigError, match="deprecated"):
        C.make_config(sft.Config, {"eval": {"every": 2}}, train__eval_every=3)


@pytest.mark.unit
def test_nested_section_renames_and_unknown_keys_keep_their_suggestion():
    from rlhfkit.recipes import dpo

    cfg = load_config(dpo.Config, None, ["precompute_reference=true", "reference_cache_dir=/tmp/x", "gamma=0.7", "lam=0.2"])
    assert (cfg.reference.precompute, cfg.reference.cache_dir) == (True, "/tmp/x")
    assert (cfg.simpo_gamma, cfg.orpo_lambda) == (0.7, 0.2)
    with pytest.raises(ConfigError, match="did you mean 'eval.batch_size'"):
        load_config(sft.Config, None, ["eval.batch_sise=3"])


@pytest.mark.unit
def test_help_lists_no_deprecated_name_and_lists_literal_choices(capsys):
    from rlhfkit.recipes import dpo

    cli.print_help("dpo", dpo.Config)
    text = capsys.readouterr().out
    keys = {line.split(" = ")[0].strip() for line in text.splitlines() if " = " in line and line.startswith("  ")
            and not line.startswith("      ")}
    assert {"eval.every", "eval.batch_size", "eval.max_rows", "reference.precompute", "simpo_gamma", "orpo_lambda",
            "train.best_metric", "train.best_mode"} <= keys
    assert not keys & {"train.eval_every", "eval_batch_size", "eval_max_rows", "precompute_reference", "gamma", "lam"}
    assert "One of: sigmoid, robust, ipo, hinge, simpo, orpo." in " ".join(text.split())


@pytest.mark.unit
def test_best_metric_must_be_logged_by_the_recipe():
    with pytest.raises(ConfigError, match="train.best_metric='eval/accuracy' is never logged by sft"):
        load_config(sft.Config, None, ["train.best_metric=eval/accuracy"])
    with pytest.raises(ConfigError, match="'train.best_mode' must be one of"):
        load_config(sft.Config, None, ["train.best_mode=largest"])
