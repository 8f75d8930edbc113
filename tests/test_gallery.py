"""Every gallery entry (examples/gallery/*.yaml) runs: the hub names stay in the files, and this test
swaps them for tiny local stand-ins of the same kind (a tiny T5 for FLAN-T5, a tiny Llama for Qwen / Pythia / SmolLM, a tiny two-label BERT
classifier for the RoBERTa hate-speech model, a tiny Llama for the causal models, `save_to_disk`
folders with the same splits and columns for the hub datasets) and shrinks the schedules."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.cli import main
from rlhfkit.utils import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
GALLERY = sorted((ROOT / "examples" / "gallery").glob("*.yaml"))
DATA = ROOT / "examples" / "data"

# per-stage overrides that make every stage a few seconds
SMALL = {
    "sft": ["train.max_steps=1", "train.batch_size=2", "data.max_rows=8", "model.max_length=128"],
    "reward": ["train.max_steps=1", "train.batch_size=2", "data.max_rows=8", "model.max_length=128"],
    "ppo": ["train.max_steps=1", "rollout_batch_size=4", "train.batch_size=2", "data.max_rows=8",
            "generation.max_new_tokens=6", "generation.min_new_tokens=0"],
    "grpo": ["train.max_steps=1", "prompts_per_step=2", "samples_per_prompt=2", "train.batch_size=4",
             "generation.max_new_tokens=6", "data.max_rows=8", "model.max_length=128", "eval.max_rows=2",
             "generation.vllm.max_model_len=128"],
    "dpo": ["train.max_steps=1", "train.batch_size=2", "data.max_rows=8", "model.max_length=128"],
    # a tiny random model's replies pass no quality check: keep every best/worst pair
    "prefs": ["data.max_rows=4", "generation.max_new_tokens=6", "max_attempts=1", "min_gap=0",
              "checks.label_column=null", "checks.clean=false", "checks.end_punctuation=null"],
    "eval": ["data.max_rows=3", "generation.max_new_tokens=6", "generation.min_new_tokens=0"],
}


def _dataset_dict(folder: Path, splits: dict[str, list[dict]]) -> str:
    import datasets

    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, tiny_t5, tiny_llama):
    """hub name -> local folder of the same kind."""
    from transformers import BertForSequenceClassification

    from rlhfkit.tiny import save_tiny_bert

    d = tmp_path_factory.mktemp("gallery")
    bert = save_tiny_bert(d / "bert1")
    clf = BertForSequenceClassification.from_pretrained(bert, num_labels=2, id2label={0: "nothate", 1: "hate"},
                                                        label2id={"nothate": 0, "hate": 1}, ignore_mismatched_sizes=True)
    clf.save_pretrained(d / "hate_clf")
    for f in Path(bert).glob("*.txt"):
        (d / "hate_clf" / f.name).write_text(f.read_text())
    for f in Path(bert).glob("*token*"):
        (d / "hate_clf" / f.name).write_text(f.read_text())
    dialogs = [{"id": r["id"], "dialogue": r["dialogue"][:150], "summary": r["summary"]}  # short, as the lab keeps
               for r in read_jsonl(DATA / "dialogsum_small.jsonl")][:24]
    tldr = [{"prompt": f"SUBREDDIT: r/{r['subreddit']}\nTITLE: {r['title']}\nPOST: {r['post']}\nTL;DR:",
             "label": r["summary"]} for r in read_jsonl(DATA / "tldr_small.jsonl")][:24]
    comparisons = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_jsonl(DATA / "tldr_comparisons.jsonl")][:24]
    return {
        "google/flan-t5-base": tiny_t5,
        "facebook/roberta-hate-speech-dynabench-r4-target": str(d / "hate_clf"),
        "EleutherAI/pythia-410m": tiny_llama,
        "HuggingFaceTB/SmolLM2-360M-Instruct": tiny_llama,
        "Qwen/Qwen2.5-0.5B-Instruct": tiny_llama,
        "trl-lib/tldr": _dataset_dict(d / "trl_tldr", {"train": [{"prompt": r["prompt"]} for r in tldr[:12]],
                                                       "validation": [{"prompt": r["prompt"]} for r in tldr[12:16]]}),
        "knkarthick/dialogsum": _dataset_dict(d / "dialogsum", {"train": dialogs[:16], "test": dialogs[16:]}),
        "CarperAI/openai_summarize_tldr": _dataset_dict(d / "tldr", {"train": tldr[:12], "valid": tldr[12:18], "test": tldr[18:]}),
        "CarperAI/openai_summarize_comparisons": _dataset_dict(d / "cmp", {"train": comparisons[:16], "test": comparisons[16:]}),
    }


@pytest.mark.learning
@pytest.mark.parametrize("path", GALLERY, ids=[p.stem for p in GALLERY])
def test_gallery_entry_runs_with_tiny_stand_ins(path, stand_ins, tmp_path):
    import yaml

    text = path.read_text()
    hub = [name for name in stand_ins if name in text]
    assert hub, f"{path.name} names no hub model or dataset: it is not a gallery entry of a hub system"
    for name in hub:
        text = text.replace(name, stand_ins[name])
    pipeline = yaml.safe_load(text)
    pipeline["output_dir"] = str(tmp_path / "out")
    local = tmp_path / path.name
    local.write_text(yaml.safe_dump(pipeline))
    stages = pipeline["stages"]
    overrides = []
    for stage in stages:
        overrides += [f"{stage['name']}.{o}" for o in SMALL[stage["command"]]]
        if stage["config"].get("generation", {}).get("backend", "hf") == "vllm":
            # the tiny stand-in's head size is one vLLM's CPU attention lacks; the vLLM path itself is
            # tested in tests/test_vllm.py (the vllm tier)
            overrides.append(f"{stage['name']}.generation.backend=hf")
    assert main(["run", str(local), *overrides]) == 0
    for stage in stages:
        summary = json.loads((tmp_path / "out" / stage["name"] / "summary.json").read_text())
        if stage["command"] in ("sft", "reward", "ppo", "dpo", "grpo"):
            assert summary["steps"] == 1 and summary["tokens"] > 0
