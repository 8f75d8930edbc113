"""Reward-model recipe: learns a marker word; its saved folder scores like its own forward."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import write_jsonl
from rlhfkit.config import DataConfig, ModelConfig, TrainConfig, UserError
from rlhfkit.data import load_splits
from rlhfkit.recipes import reward
from rlhfkit.rewards import RewardModel, join_prompt_completion
from tiny import WORDS

ROOT = Path(__file__).parent.parent
MARK = "thanks"
FILL = [w for w in WORDS if w != MARK]


def marker_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs of random word strings of similar length; only the chosen one holds the marker."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chosen = [rng.choice(FILL) for _ in range(rng.randint(4, 9))]
        chosen.insert(rng.randint(0, len(chosen)), MARK)
        rejected = [rng.choice(FILL) for _ in range(rng.randint(5, 10))]
        rows.append({"prompt": f"write a reply about the {rng.choice(FILL)}", "chosen": " ".join(chosen),
                     "rejected": " ".join(rejected), "m": round(rng.uniform(0.0, 1.0), 3)})
    return rows


def tiny_bert(root: Path, seed: int = 0) -> str:
    """A random 2-layer BERT with a one-logit head and a word-level WordPiece vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS) | {"write", "reply", "about"})
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab=str(root / "vocab.txt"), model_max_length=128)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=1))
    out = root / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("bert"))


def rm_config(model: str, data: str, out: Path, **train) -> reward.Config:
    t = dict(output_dir=str(out), lr=1e-3, batch_size=8, max_steps=40, progress=False, seed=0)
    t.update(train)
    return reward.Config(model=ModelConfig(name_or_path=model, max_length=64),
                         data=DataConfig(path=data, eval_fraction=0.25, chat_template="false"),
                         train=TrainConfig(**t))


def rm_scores(path: str, rows: list[dict], side: str, **kw) -> np.ndarray:
    return np.array(RewardModel(path, device="cpu", **kw)([r["prompt"] for r in rows], [r[side] for r in rows]))


def check_saved_matches_recipe(cfg: reward.Config, summary: dict) -> None:
    """RewardModel(output_dir) reproduces the recipe's own numbers: training-set reward statistics
    (reward_stats.json) and the final held-out accuracy, margin and loss."""
    out = cfg.train.output_dir
    train, held = load_splits(cfg.data)
    r = np.concatenate([rm_scores(out, train.rows, "chosen"), rm_scores(out, train.rows, "rejected")])
    stats = json.loads((Path(out) / "reward_stats.json").read_text())
    assert stats["mean"] == pytest.approx(float(r.mean()), abs=1e-4)
    assert stats["std"] == pytest.approx(float(r.std()), rel=1e-4)  # population std
    assert summary["reward_mean"] == stats["mean"] and summary["reward_std"] == stats["std"]
    rc, rr = rm_scores(out, held.rows, "chosen"), rm_scores(out, held.rows, "rejected")
    assert summary["eval_end"]["eval/accuracy"] == pytest.approx(float((rc > rr).mean()), abs=1e-6)
    assert summary["eval_end"]["eval/margin"] == pytest.approx(float((rc - rr).mean()), abs=1e-4)
    m = np.array([row.get("m", 0.0) for row in held.rows]) if cfg.margin_column else 0.0
    loss = float(np.mean(np.log1p(np.exp(-(rc - rr - m)))))  # -log sigmoid(r_c - r_r - m)
    assert summary["eval_end"]["eval/loss"] == pytest.approx(loss, rel=1e-3, abs=1e-5)
    norm = rm_scores(out, train.rows, "chosen", normalize=True)
    assert norm == pytest.approx((rm_scores(out, train.rows, "chosen") - stats["mean"]) / stats["std"], abs=1e-5)


@pytest.mark.learning
@pytest.mark.parametrize("backbone", ["bert", "tiny_llama"])
def test_reward_model_learns_marker(backbone, bert_path, request, tmp_path):
    model = bert_path if backbone == "bert" else request.getfixturevalue(backbone)
    data = write_jsonl(tmp_path / "prefs.jsonl", marker_rows(240))
    cfg = rm_config(model, data, tmp_path / "rm", max_steps=60, lr=1e-3 if backbone == "bert" else 3e-3)
    summary = reward.run(cfg)
    # 60 held-out pairs; a random scorer sits near 0.5, one that found the marker near 1.0
    assert summary["eval_start"]["eval/accuracy"] <= 0.75, summary
    assert summary["eval_end"]["eval/accuracy"] >= 0.9, summary
    assert summary["eval_end"]["eval/margin"] > summary["eval_start"]["eval/margin"] + 0.5, summary
    assert summary["head"] == ("classifier" if backbone == "bert" else "value_head")
    out = tmp_path / "rm"
    spec = json.loads((out / "rlhfkit_reward.json").read_text())
    assert spec["kind"] == ("classifier" if backbone == "bert" else "lm_value_head")
    assert (out / "value_head.safetensors").is_file() == (backbone != "bert")
    assert {"config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "reward_stats.json"} <= {
        p.name for p in out.iterdir()}
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval/accuracy" in line]
    assert [e["step"] for e in evals] == [0, 60]
    check_saved_matches_recipe(cfg, summary)
    # the saved tokenizer truncates where training did (model.max_length)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 64


@pytest.mark.unit
def test_seq2seq_value_head_with_lora_and_margin(tiny_t5, tmp_path):
    """T5 + LoRA + value head: saved merged, the adapter beside it; a margin column enters the loss."""
    data = write_jsonl(tmp_path / "prefs.jsonl", marker_rows(40))
    cfg = rm_config(tiny_t5, data, tmp_path / "rm", max_steps=3, lr=1e-2, batch_size=4)
    cfg.lora.enabled, cfg.lora.target_modules = True, ["all-linear"]
    cfg.margin_column = "m"
    summary = reward.run(cfg)
    out = tmp_path / "rm"
    assert json.loads((out / "rlhfkit_reward.json").read_text())["model_type"] == "seq2seq"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert summary["pairs"] == 3 * 4
    check_saved_matches_recipe(cfg, summary)


@pytest.mark.unit
def test_join_is_the_scored_text(bert_path, tmp_path):
    """The recipe tokenizes join_prompt_completion(prompt, completion), as the reward_model reward does."""
    rows = [{"prompt": "write a reply about the cat", "chosen": "thanks friend", "rejected": "bad dog"}]
    cfg = rm_config(bert_path, write_jsonl(tmp_path / "p.jsonl", rows * 4), tmp_path / "rm")
    tok = reward.build_net(cfg, "classifier", torch.device("cpu"))[1]
    texts = reward.pair_texts(load_splits(cfg.data)[0], cfg, tok, reward.DataStats())
    assert texts[0] == (join_prompt_completion(rows[0]["prompt"], "thanks friend"),
                        "write a reply about the cat bad dog", 0.0)
    pairs = reward.tokenize(texts, tok, cfg, append_eos=False, stats=reward.DataStats())
    assert pairs[0].chosen == tok("write a reply about the cat thanks friend")["input_ids"]
    assert tok.convert_ids_to_tokens(pairs[0].chosen)[-1] == "[SEP]"  # BERT: no EOS, [SEP] ends the text


@pytest.mark.unit
def test_margin_column_errors(bert_path, tmp_path):
    rows = marker_rows(8)
    rows[2]["m"] = "big"
    cfg = rm_config(bert_path, write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "rm")
    cfg.margin_column = "m"
    tok = reward.build_net(cfg, "classifier", torch.device("cpu"))[1]
    from rlhfkit.data import read_table

    table = read_table(cfg.data.path)
    with pytest.raises(UserError, match=r"p\.jsonl: row 3: column 'm' must be a finite number, got 'big'"):
        reward.pair_texts(table, cfg, tok, reward.DataStats())
    cfg.margin_column = "strength"
    with pytest.raises(UserError, match=r"p\.jsonl: row 1: missing column 'strength'"):
        reward.pair_texts(table, cfg, tok, reward.DataStats())


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "rlhfkit.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.unit
def test_cli_bad_input_exits_2(bert_path, tmp_path):
    rows = marker_rows(6)
    del rows[1]["rejected"]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    (tmp_path / "bad_head.yaml").write_text(f"model: {{name_or_path: {bert_path}}}\nhead: regression\n")
    res = _cli(["reward", "--config", "bad_head.yaml"], tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: bad_head.yaml: 'head' must be one of"), res.stderr
    (tmp_path / "bad_row.yaml").write_text(
        f"model: {{name_or_path: {bert_path}}}\ndata: {{path: {data}}}\ntrain: {{output_dir: {tmp_path / 'o'}}}\n")
    res = _cli(["reward", "--config", "bad_row.yaml"], tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"error: {data}: row 2: missing column 'rejected' (columns: prompt, chosen, m)"


@pytest.mark.unit
def test_shipped_example_loads():
    from rlhfkit.config import load_config

    cfg = load_config(reward.Config, ROOT / "examples" / "reward_minilm.yaml")
    assert cfg.model.name_or_path == "asset:minilm" and cfg.head == "classifier"
    assert cfg.data.columns == {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    assert (ROOT / cfg.data.path).is_file() and (ROOT / cfg.data.eval_path).is_file()


@pytest.mark.unit
def test_pair_prefix_lens_by_hand():
    ids = torch.tensor([[5, 6, 7, 0], [5, 9, 0, 0], [5, 6, 8, 9], [5, 9, 4, 0]])  # rows 0,1 chosen; 2,3 rejected
    att = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    assert reward.pair_prefix_lens(ids, att) == [2, 2, 2, 2]
    assert reward.pair_prefix_lens(ids[[0, 2]], att[[0, 2]]) == [2, 2]
    assert reward.pair_prefix_lens(ids[[0, 0]], att[[0, 0]]) == [3, 3]  # identical rows: every real token


@pytest.mark.unit
def test_shared_prefix_rewards_equal_separate_rewards(tiny_llama):
    """A pair's common prompt is computed once: same rewards and gradients as two full forwards."""
    from rlhfkit.rewards import reward_input_ids

    cfg = reward.Config(model=ModelConfig(name_or_path=tiny_llama), head="value_head")
    torch.manual_seed(0)
    net, tok = reward.build_net(cfg, "value_head", torch.device("cpu"))
    texts = [("the cat sees a dog", " red fish runs", " one two"), ("hello there", " sun", " big small fast slow"),
             ("why", " because", " because of the rain")]
    pairs = [reward.Pair(reward_input_ids(tok, join_prompt_completion(p, c), 64, True)[0],
                         reward_input_ids(tok, join_prompt_completion(p, r), 64, True)[0]) for p, c, r in texts]
    batch = reward.collate_pairs(pairs, tok.pad_token_id, False)
    prefix = reward.pair_prefix_lens(batch["input_ids"], batch["attention_mask"])
    assert min(prefix) >= 1 and net._shared_prefix_rewards(batch["input_ids"], batch["attention_mask"], prefix) is not None

    def run(shared: bool):
        net.zero_grad(set_to_none=True)
        r = net(batch["input_ids"], batch["attention_mask"], prefix_lens=prefix if shared else None)
        r.sum().backward()
        return r.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    (r1, g1), (r0, g0) = run(True), run(False)
    torch.testing.assert_close(r1, r0, atol=1e-5, rtol=0)
    assert g1.keys() == g0.keys() and len(g1) > 0
    for n in g1:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-4, rtol=1e-4)
    assert float((r0[:3] - r0[3:]).abs().max()) > 1e-4  # chosen and rejected really score differently
