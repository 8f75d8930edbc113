"""Every shipped YAML under examples/ loads and validates (litgpt's test_config_hub)."""
from pathlib import Path

import pytest
import yaml

from rlhfkit.cli import COMMANDS
from rlhfkit.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def command_of(path: Path) -> str:
    """The command a file is for: pipelines have 'stages'; others are named <command>_*.yaml."""
    raw = yaml.safe_load(path.read_text())
    if "stages" in raw:
        return "run"
    name = path.stem.split("_")[0]
    assert name in COMMANDS, f"{path.name}: name it <command>_<what>.yaml (commands: {', '.join(COMMANDS)})"
    return name


@pytest.mark.unit
def test_there_are_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.unit
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_loads_and_validates(path):
    """... with no deprecated key (the ``[rlhfkit] warning: 'old' is deprecated`` line)."""
    import importlib
    import logging

    command = command_of(path)
    module_name, preset = COMMANDS[command]
    module = importlib.import_module(module_name)
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("rlhfkit").addHandler(handler)
    try:
        cfg = load_config(module.Config, path, preset)
        if command == "run":  # every stage must build and validate too (with placeholder outputs)
            from rlhfkit.recipes import pipeline

            outputs = {}
            for stage in cfg.stages:
                stage_cfg, _ = pipeline.stage_config(stage, "/tmp/rlhfkit-example", outputs, [])
                outputs[stage.name] = f"/tmp/rlhfkit-example/{stage.name}"
                assert stage_cfg is not None
    finally:
        logging.getLogger("rlhfkit").removeHandler(handler)
    assert not [w for w in warnings if "deprecated" in w], warnings
    # data files named by the example exist in the repository
    text = path.read_text()
    for token in text.split():
        token = token.strip("\"',{}[]")
        if token.startswith("examples/data/"):
            assert (ROOT / token).is_file(), f"{path.name} names {token}, which does not exist"
