"""Evaluation recipe: numbers against hand / reference computations, files, sampled KL, errors."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import write_jsonl
from rlhfkit import metrics as M
from rlhfkit.cli import main as cli_main
from rlhfkit.config import load_config
from rlhfkit.recipes import evaluate
from tiny import save_tiny

ROOT = Path(__file__).parent.parent
HERE = Path(__file__).parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Judge = number of characters (tests/reward_fns_example.py:n_chars), so every comparison is countable:
#            before  mid  after   (characters)
#   row 1      41     7    43
#   row 2      30     6    35
#   row 3      11    11    11
#   row 4      50    20    10
ROWS = [
    {"prompt": "Reply to the email.", "before": "you are a fucking idiot, shut the fuck up", "mid": "Thanks.",
     "after": "Thank you for the email, I will reply soon.", "reference": "Thanks, I will reply soon.",
     "source": "Could you reply to my email about the meeting?"},
    {"prompt": "Describe the weather.", "before": "The damn weather is shit today", "mid": "Sunny.",
     "after": "The weather is sunny and warm today", "reference": "It is sunny and warm.",
     "source": "The forecast says sunshine and warm air all day."},
    {"prompt": "Say hello.", "before": "hello there", "mid": "hello there", "after": "hello there",
     "reference": "hello", "source": "Greet the visitor."},
    {"prompt": "Summarize the report.", "before": "The committee met and agreed to publish the report",
     "mid": "The committee agreed", "after": "The report", "reference": "The committee will publish the report.",
     "source": "The committee met on Tuesday and agreed to publish the report before the end of the month."},
]


def file_config(data: str, out: Path, **extra) -> dict:
    cfg = {
        "models": [{"name": "before"}, {"name": "mid"}, {"name": "after"}],
        "data": {"path": data},
        "reference_column": "reference",
        "source_column": "source",
        "rewards": [{"kind": "python", "function": "reward_fns_example:n_chars", "name": "chars"},
                    {"kind": "length", "min_words": 3, "max_words": 8}],
        "judge": "chars",
        "judges": [{"kind": "profanity_check", "trained_against": True}, {"kind": "wordlist"}],
        "copy_ngram": 2,
        "win_rates": ["total-length", "length"],
        "output_dir": str(out),
        "progress": False,
    }
    cfg.update(extra)
    return cfg


def write_config(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def file_eval(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("eval_file")
    data = write_jsonl(tmp / "completions.jsonl", ROWS)
    cfg = load_config(evaluate.Config, write_config(tmp / "eval.yaml", file_config(data, tmp / "out", tokenizer=tiny_llama)))
    return evaluate.run(cfg), tmp / "out", cfg


@pytest.mark.unit
def test_toxicity_change_matches_the_detox_formula(file_eval):
    from profanity_check import predict_prob

    m, _, _ = file_eval
    before = predict_prob([r["before"] for r in ROWS])
    after = predict_prob([r["after"] for r in ROWS])
    assert m["toxicity"]["after"]["mean"] == pytest.approx(float(np.mean(after)))
    assert m["toxicity"]["after"]["std"] == pytest.approx(float(np.std(after)))  # population std
    change = m["toxicity_change"]["after"]
    assert change["mean_improvement_pct"] == pytest.approx(100 * (before.mean() - after.mean()) / before.mean())
    assert change["std_improvement_pct"] == pytest.approx(100 * (before.std() - after.std()) / before.std())
    assert change["mean_improvement_pct"] > 50  # the polite rewrites are far less toxic
    assert "before" not in m["toxicity_change"]


@pytest.mark.unit
def test_rouge_relevance_rewards_lengths(file_eval, tiny_llama):
    from rouge_score import rouge_scorer
    from transformers import AutoTokenizer

    m, _, _ = file_eval
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("before", "after"):
        direct = [scorer.score(r["reference"], r[name]) for r in ROWS]
        for t in ("rouge1", "rouge2", "rougeL"):
            assert m["rouge"][name][t] == pytest.approx(np.mean([d[t].fmeasure for d in direct]))
    assert m["semantic_relevance"]["after"] == pytest.approx(
        M.semantic_relevance([r["after"] for r in ROWS], [r["source"] for r in ROWS]), abs=1e-5)
    # characters: (43 + 35 + 11 + 10) / 4; length reward (3..8 words) of 9, 7, 2, 2 words: 7/8, 1, 2/3, 2/3
    assert m["reward"]["after"]["chars"] == pytest.approx(99 / 4)
    assert m["reward"]["after"]["length"] == pytest.approx((7 / 8 + 1 + 2 / 3 + 2 / 3) / 4)
    assert m["reward"]["after"]["total"] == pytest.approx(99 / 4 + (7 / 8 + 1 + 2 / 3 + 2 / 3) / 4)
    assert m["length"]["after"]["words"] == pytest.approx((9 + 7 + 2 + 2) / 4)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert m["length"]["after"]["tokens"] == pytest.approx(
        np.mean([len(tok(r["after"], add_special_tokens=False)["input_ids"]) for r in ROWS]))
    assert "kl" not in m  # no reference configured


@pytest.mark.unit
def test_win_rates_elo_bradley_terry(file_eval):
    m, _, cfg = file_eval
    # after vs before: wins rows 1, 2, tie row 3, loses row 4 -> (1 + 1 + 0.5 + 0) / 4
    assert m["win_rate"]["after"]["before"] == pytest.approx(0.625)
    assert m["win_rate"]["before"]["mid"] == pytest.approx(3.5 / 4)
    assert m["win_rate_vs_baseline"] == {"mid": pytest.approx(0.125), "after": pytest.approx(0.625)}
    # wins of row model over column model (before, mid, after), ties half each
    W = [[0, 3.5, 1.5], [0.5, 0, 1.5], [2.5, 2.5, 0]]
    assert m["wins"] == W
    bt = M.bradley_terry(W, scale="elo", prior=cfg.bt_prior)
    assert [m["bradley_terry"][n] for n in ("before", "mid", "after")] == pytest.approx(bt)
    matches = []  # prompt by prompt, pairs in list order, outcome = first model's score
    for out in ([1, 0, 0], [1, 0, 0], [0.5, 0.5, 0.5], [1, 1, 1]):  # (before-mid, before-after, mid-after)
        matches += [("before", "mid", out[0]), ("before", "after", out[1]), ("mid", "after", out[2])]
    assert m["elo"] == pytest.approx(M.elo_ratings(matches, k=32.0))


@pytest.mark.unit
def test_two_model_bradley_terry_by_hand():
    judge = {"before": [41, 30, 11, 50], "after": [43, 35, 11, 10]}
    comp = evaluate.compare(["before", "after"], judge, elo_k=32.0, bt_prior=0.5)
    # wins 1.5 vs 2.5, plus 0.5 pseudo-wins each way: odds after:before = 3:2, Elo gap 400 log10(1.5)
    assert comp["bradley_terry"]["after"] == pytest.approx(1000 + 200 * math.log10(1.5))
    assert comp["bradley_terry"]["before"] == pytest.approx(1000 - 200 * math.log10(1.5))
    # the first Elo match (after wins, both at 1000): +-16
    first = evaluate.compare(["before", "after"], {"before": [1.0], "after": [2.0]}, 32.0, 0.5)
    assert first["elo"] == {"before": 984.0, "after": 1016.0}


@pytest.mark.unit
def test_files_samples_report_plots(file_eval):
    from matplotlib.image import imread

    from rlhfkit.apps.view import read_samples

    m, out, _ = file_eval
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    # gains (after - before characters): row 1 +2, row 2 +5, row 3 0, row 4 -40; largest first
    assert [s["gain"] for s in samples] == [5, 2, 0, -40]
    assert [s["prompt"] for s in samples] == [ROWS[i]["prompt"] for i in (1, 0, 2, 3)]
    top = samples[0]
    assert top["completions"] == {k: ROWS[1][k] for k in ("before", "mid", "after")}
    assert top["rewards"] == {"before": 30, "mid": 6, "after": 35} and top["reference"] == ROWS[1]["reference"]
    assert read_samples(out / "samples.jsonl") == samples  # the viewer reads it as written
    report = (out / "report.md").read_text()
    section = report.split("## Samples sorted by gain")[1]
    table = [line for line in section.splitlines() if line.startswith("| ")][1:]  # rows after the header
    assert [line.split(" | ")[0] for line in table] == ["| 2", "| 1", "| 3", "| 4"]
    assert [float(line.rstrip(" |").split(" | ")[-1]) for line in table] == [5, 2, 0, -40]
    assert ROWS[1]["before"] in table[0] and ROWS[1]["after"] in table[0]
    for png in ("reward_hist.png", "toxicity_cdf.png", "models.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert imread(out / png).shape[0] > 100
        assert f"![{png}]({png})" in report
    assert "| after | file |" in report


@pytest.mark.unit
def test_summary_json_holds_the_headline_numbers(file_eval):
    m, out, _ = file_eval
    s = json.loads((out / "summary.json").read_text())
    assert s["command"] == "eval" and s["prompts"] == 4 and s["models"] == ["before", "mid", "after"]
    # judge = characters (table above): means 132/4, 44/4, 99/4
    assert s["judge"] == "chars" and s["judge_mean"] == {"before": 33.0, "mid": 11.0, "after": 24.75}
    # vs before: mid loses 3 and ties 1 -> 0.5/4; after wins 2, ties 1, loses 1 -> 2.5/4
    assert s["win_rate_vs_baseline"] == {"mid": 0.125, "after": 0.625}
    assert s["toxicity_mean"] == {n: m["toxicity"][n]["mean"] for n in m["models"]}
    assert s["eval_seconds"] > 0


@pytest.mark.unit
def test_failed_eval_leaves_no_summary(tmp_path):
    """summary.json marks a finished evaluation: a stale one goes when a run starts, a new one only on success."""
    data = write_jsonl(tmp_path / "c.jsonl", ROWS)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "summary.json").write_text("{}")
    cfg = load_config(evaluate.Config, write_config(tmp_path / "e.yaml", file_config(data, tmp_path / "o", judge="x")))
    with pytest.raises(Exception, match="judge 'x' is not a configured score"):
        evaluate.run(cfg)
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_llama):
    """A LoRA adapter with random (non-zero) B matrices: the adapted model differs from its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return str(out)


@pytest.mark.unit
def test_generation_and_sampled_kl(tiny_llama, lora_adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.config import GenerationConfig
    from rlhfkit.generation import generate

    other = save_tiny("llama", tmp_path / "other", seed=1)
    prompts = [{"prompt": p} for p in ("the cat sees", "a dog runs to the", "hello friend", "the sun", "one two", "red")]
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    gen = {"max_new_tokens": 8, "batch_size": 4}
    cfg = load_config(evaluate.Config, write_config(tmp_path / "e.yaml", {
        "models": [{"name": "before", "model": {"name_or_path": tiny_llama}},
                   {"name": "same", "model": {"name_or_path": tiny_llama}},
                   {"name": "lora", "model": {"name_or_path": tiny_llama}, "adapter_path": lora_adapter},
                   {"name": "other", "model": {"name_or_path": other}}],
        "data": {"path": data, "chat_template": "false"}, "generation": gen, "seed": 3,
        "kl_reference": "before", "output_dir": str(tmp_path / "out"), "progress": False}))
    m = evaluate.run(cfg)
    assert m["kl"]["before"] == 0.0 and abs(m["kl"]["same"]) < 1e-6
    assert m["kl"]["lora"] > 0 and m["kl"]["other"] > 0
    assert m["judge"] == "profanity_check" and m["kl_reference"] == "before"  # the first (default) judge

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    texts = [p["prompt"] for p in prompts]
    g = GenerationConfig(**gen)
    expected = generate(base, tok, texts, g, seed=3)  # the recipe samples exactly what generation.generate does
    samples = {s["prompt"]: s for s in map(json.loads, (tmp_path / "out" / "samples.jsonl").read_text().splitlines())}
    assert [samples[t]["completions"]["before"] for t in texts] == expected
    assert [samples[t]["completions"]["same"] for t in texts] == expected

    # sampled KL against a plain transformers forward over prompt + sampled ids
    model = AutoModelForCausalLM.from_pretrained(other).eval()
    _, ids = evaluate.generate_samples(model, tok, texts, g, seed=3, progress=False, desc="x")
    kl = evaluate.sampled_kl(model, base, tok, texts, ids, batch_size=4)

    def seq_logp(lm, prompt, resp):
        p = tok(prompt)["input_ids"]
        full = torch.tensor([p + resp])
        with torch.no_grad():
            lp = torch.log_softmax(lm(full).logits[0].double(), -1)  # (T, V)
        return sum(float(lp[t - 1, full[0, t]]) for t in range(len(p), full.shape[1]))

    hand = [seq_logp(model, t, r) - seq_logp(base, t, r) for t, r in zip(texts, ids)]
    assert kl == pytest.approx(hand, abs=1e-3)
    assert m["kl"]["other"] == pytest.approx(float(np.mean(kl)), abs=1e-6)


def _run_cli(cfg_path: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "rlhfkit.cli", "eval", "--config", cfg_path], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.unit
def test_cli_bad_config_and_bad_reward_exit_2(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", ROWS)
    bad = write_config(tmp_path / "bad.yaml", file_config(data, tmp_path / "o", judge="charz"))
    res = _run_cli(bad, tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "error: judge 'charz' is not a configured score; choose one of ['total', 'chars', 'length', 'profanity_check', 'wordlist']")
    wrong = file_config(data, tmp_path / "o", rewards=[{"kind": "python", "function": "reward_fns_example:wrong_count"}])
    wrong.pop("judge")
    wrong.pop("win_rates")
    res = _run_cli(write_config(tmp_path / "wrong.yaml", wrong), tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "error: reward 'python:reward_fns_example:wrong_count' returned 3 values for 4 completions")
    assert not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.unit
@pytest.mark.parametrize("change, message", [
    ({"models": []}, "'models' is empty"),
    ({"models": [{"name": "before"}, {"name": "before"}]}, "names must be distinct, repeated: ['before']"),
    ({"models": [{"name": "before"}, {"name": "later"}]}, "c.jsonl: row 1: missing column 'later'"),
    ({"reference_column": "summary"}, "c.jsonl: row 1: missing column 'summary' (reference_column"),
    ({"kl_reference": "nobody"}, "kl_reference 'nobody' is not a model name"),
    ({"kl_reference": "before"}, "kl_reference 'before' has no 'model'"),
    ({"toxicity": "perspective"}, "toxicity must be 'profanity_check', 'hatesonar' or null"),
    ({"judges": [{"kind": "classifier"}]}, "judges: 'classifier' (kind classifier) needs 'model'"),
    ({"judges": [{"kind": "hatesonar"}, {"kind": "hatesonar"}]}, "judges: names must be distinct"),
    ({"judges": [{"kind": "perspective"}]}, "judges"),
    ({"perplexity_scorer": "nobody"}, "perplexity_scorer 'nobody' is not a model name"),
    ({"copy_ngram": 0}, "copy_ngram must be >= 1"),
    ({"win_rates": ["total-chars-x"]}, "win_rates: 'total-chars-x' is not a configured score"),
    ({"modles": []}, "unknown key 'modles'; did you mean 'models'?"),
    ({"rewards": [{"kind": "python", "function": "reward_fns_example:returns_nan"}], "judge": None, "win_rates": []},
     "reward 'python:reward_fns_example:returns_nan' returned nan for completion 0"),
])
def test_bad_input_names_the_problem(change, message, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "c.jsonl", ROWS)
    cfg = file_config(data, tmp_path / "o")
    cfg.update(change)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["eval", "--config", write_config(tmp_path / "bad.yaml", cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err, err


@pytest.mark.unit
def test_non_text_completion_is_reported(tmp_path, capsys):
    rows = [dict(r) for r in ROWS]
    rows[2]["mid"] = 3
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    assert cli_main(["eval", "--config", write_config(tmp_path / "b.yaml", file_config(data, tmp_path / "o"))]) == 2
    assert (f"error: {data}: row 3: column 'mid' (completions of model 'mid') must be text, got int"
            in capsys.readouterr().err)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["tiny_gpt2", "tiny_llama"])
def test_response_logits_equal_the_full_forward_at_the_response_positions(kind, request):
    """The LM head runs on the response positions only (logits_to_keep): the same logits as the
    full forward's, in row-major order of the response tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.data import Example, collate

    path = request.getfixturevalue(kind)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rows = [Example(tok(p)["input_ids"], tok(r)["input_ids"]) for p, r in
            [("the cat sees", " a dog"), ("hello", " my good old friend"), ("a dog runs to the", " park")]]
    batch = collate(rows, tok.pad_token_id, False)
    got = evaluate.response_logits(model, batch)
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=position_ids).logits  # (B, T, V)
    mask = batch["labels"] != -100
    assert got.shape == (int(mask.sum()), full.shape[-1])
    torch.testing.assert_close(got, full[:, :-1][mask[:, 1:]], atol=1e-5, rtol=0)


@pytest.mark.unit
def test_token_kl_on_greedy_responses(tiny_llama, tmp_path):
    """Greedy eval: KL is sum_t KL(pi(.|s_t) || ref(.|s_t)) along the responses, equal to a plain
    transformers computation, zero for a model against itself and never negative."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.config import GenerationConfig

    other = save_tiny("llama", tmp_path / "other", seed=1)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model = AutoModelForCausalLM.from_pretrained(other).eval()
    texts = ["the cat sees", "a dog runs to the", "hello friend", "red"]
    g = GenerationConfig(max_new_tokens=6, do_sample=False, batch_size=4)
    _, ids = evaluate.generate_samples(model, tok, texts, g, seed=0, progress=False, desc="x")
    kl = evaluate.token_kl(model, base, tok, texts, ids, batch_size=3)

    def hand(prompt, resp):
        p = tok(prompt)["input_ids"]
        full = torch.tensor([p + resp])
        with torch.no_grad():
            lp = torch.log_softmax(model(full).logits[0].double(), -1)  # (T, V)
            lq = torch.log_softmax(base(full).logits[0].double(), -1)  # (T, V)
        return sum(float((lp[t - 1].exp() * (lp[t - 1] - lq[t - 1])).sum()) for t in range(len(p), full.shape[1]))

    assert kl == pytest.approx([hand(t, r) for t, r in zip(texts, ids)], abs=1e-4)
    assert all(k > 0 for k in kl)
    assert evaluate.token_kl(model, model, tok, texts, ids, batch_size=4) == pytest.approx([0.0] * 4, abs=1e-6)

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": t} for t in texts])
    cfg = load_config(evaluate.Config, write_config(tmp_path / "e.yaml", {
        "models": [{"name": "before", "model": {"name_or_path": tiny_llama}},
                   {"name": "other", "model": {"name_or_path": other}}],
        "data": {"path": data, "chat_template": "false"}, "generation": {"max_new_tokens": 6, "do_sample": False},
        "kl_reference": "before", "output_dir": str(tmp_path / "out"), "progress": False}))
    m = evaluate.run(cfg)
    assert m["kl_estimator"] == "token" and m["kl"]["before"] == 0.0
    assert m["kl"]["other"] == pytest.approx(float(np.mean(kl)), abs=1e-5)


@pytest.mark.unit
def test_samples_per_prompt_scores_every_sample(tiny_llama, tmp_path):
    from profanity_check import predict_prob
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.config import GenerationConfig
    from rlhfkit.generation import generate

    texts = ["the cat sees", "a dog runs to the", "hello friend"]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": t} for t in texts])
    gen = {"max_new_tokens": 8, "batch_size": 4, "do_sample": True}
    cfg = load_config(evaluate.Config, write_config(tmp_path / "e.yaml", {
        "models": [{"name": "before", "model": {"name_or_path": tiny_llama}}],
        "data": {"path": data, "chat_template": "false"}, "generation": gen, "seed": 5, "samples_per_prompt": 3,
        "output_dir": str(tmp_path / "out"), "progress": False}))
    m = evaluate.run(cfg)
    assert m["prompts"] == 3 and m["samples_per_prompt"] == 3

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    expected = generate(base, tok, [t for t in texts for _ in range(3)], GenerationConfig(**gen), seed=5)
    rows = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(i, j) for i in range(3) for j in range(3)]
    assert [r["completions"]["before"] for r in rows] == expected
    assert len(set(expected)) > 3  # the k samples of a prompt differ: not one completion copied
    p = predict_prob(expected)
    assert m["toxicity"]["before"]["mean"] == pytest.approx(float(np.mean(p)), abs=1e-9)  # over all 9, not per prompt
    assert m["toxicity"]["before"]["std"] == pytest.approx(float(np.std(p)), abs=1e-9)
    assert "3 prompts x 3 answers" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.unit
@pytest.mark.parametrize("extra, message", [
    ({"generation": {"do_sample": False}}, "needs generation.do_sample=true"),
    ({"generation": {"do_sample": True}, "models": [{"name": "before"}]}, "read theirs from the file"),
    ({"samples_per_prompt": 0}, "samples_per_prompt must be >= 1"),
])
def test_samples_per_prompt_config_errors(extra, message, tiny_llama, tmp_path):
    from rlhfkit.config import ConfigError

    cfg = {"models": [{"name": "before", "model": {"name_or_path": tiny_llama}}], "data": {"path": "x.jsonl"},
           "samples_per_prompt": 2, **extra}
    with pytest.raises(ConfigError, match=message):
        load_config(evaluate.Config, write_config(tmp_path / "e.yaml", cfg))


# ---- judges, confidence intervals, copying, perplexity ----

@pytest.mark.unit
def test_judges_share_and_bootstrap_cis_by_hand(file_eval):
    m, _, cfg = file_eval
    wl = m["judges"]["wordlist"]
    # better-profanity's list: 'fucking' (row 1) and 'damn'/'shit' (row 2) of before; nothing listed elsewhere
    assert wl["mean"] == {"before": 0.5, "mid": 0.0, "after": 0.0} and wl["share_above"]["before"] == 0.5
    assert wl["trained_against"] is False and m["judges"]["profanity_check"]["trained_against"] is True
    ch = wl["change"]["after"]
    # every resample with a listed word before drops to 0 after: 100% lower; those with none are undefined
    assert ch["mean_improvement_pct"] == {"estimate": 100.0, "low": 100.0, "high": 100.0}
    assert ch["share_above_change_pts"]["estimate"] == -50.0
    before, after = np.array([[1.0], [1.0], [0.0], [0.0]]), np.zeros((4, 1))
    ref = M.paired_bootstrap(lambda b, a: 100 * ((a > 0.5).mean() - (b > 0.5).mean()), before, after,
                             n_resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    assert ch["share_above_change_pts"] == pytest.approx(ref)
    assert -100.0 <= ref["low"] < -50 < ref["high"] <= 0.0
    # win rate under chars (after vs before: 1, 1, 0.5, 0 per row) with its CI over the four prompts
    wr = m["win_rate_ci"]["after"]
    assert wr["estimate"] == pytest.approx(0.625) == m["win_rate_vs_baseline"]["after"]
    assert wr == pytest.approx(M.paired_bootstrap(lambda o: o.mean(), np.array([[1.0], [1.0], [0.5], [0.0]]),
                                                  n_resamples=cfg.bootstrap_resamples, seed=cfg.seed))
    # total without the length term = characters: the same win rate; length alone (words 9, 6, 2, 9 before,
    # 9, 7, 2, 2 after; reward 7/8, 1, 2/3, 7/8 vs 7/8, 1, 2/3, 2/3): ties, ties, ties, loss -> 1.5 / 4
    assert m["win_rate_by"]["total-length"]["after"] == pytest.approx(wr)
    assert m["win_rate_by"]["length"]["after"]["estimate"] == pytest.approx(0.375)
    # reward change: characters after - before = (99 - 132) / 4
    assert m["reward_change"]["after"]["chars"]["estimate"] == pytest.approx(-33 / 4)


@pytest.mark.unit
def test_copy_rate_and_relevance_without_copied_spans(file_eval):
    m, _, _ = file_eval
    # 2-grams of 'after' found in its prompt: 'the email' (1 of 8), 'the weather' (1 of 6), none, 'the report' (1 of 1)
    assert m["copy_ngram"] == 2
    assert m["copy_rate"]["after"] == pytest.approx((1 / 8 + 1 / 6 + 0 + 1) / 4)
    # before copies only 'the report' in row 4 (1 of its 8 two-grams)
    assert m["copy_rate"]["before"] == pytest.approx(1 / 32)
    assert m["copy_rate_change"]["after"]["estimate"] == pytest.approx((1 / 8 + 1 / 6 + 1) / 4 - 1 / 32)
    sources = [r["source"] for r in ROWS]
    left = ["thank you for i will reply soon", "is sunny and warm today", ROWS[2]["after"]]
    expected = M.semantic_relevance_pairs(left, sources[:3]) + [0.0]  # row 4 is all quote: nothing left, 0
    assert m["relevance_uncopied"]["after"] == pytest.approx(float(np.mean(expected)), abs=1e-5)
    no_copy = [r["before"] for r in ROWS[:3]]  # rows 1-3 of before copy nothing: their relevance is unchanged
    assert m["relevance_uncopied"]["before"] == pytest.approx(float(np.mean(
        M.semantic_relevance_pairs(no_copy, sources[:3]) + M.semantic_relevance_pairs(
            ["the committee met and agreed to publish"], sources[3:]))), abs=1e-5)


@pytest.mark.unit
def test_perplexity_is_exp_of_mean_token_nll_and_cut_share(tiny_llama, lora_adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.config import GenerationConfig

    prompts = ["the cat sees", "a dog runs to the", "hello friend", "the sun"]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    gen = {"max_new_tokens": 6, "batch_size": 4}
    cfg = load_config(evaluate.Config, write_config(tmp_path / "e.yaml", {
        "models": [{"name": "before", "model": {"name_or_path": tiny_llama}},
                   {"name": "lora", "model": {"name_or_path": tiny_llama}, "adapter_path": lora_adapter}],
        "data": {"path": data, "chat_template": "false"}, "generation": gen, "seed": 3, "judges": [],
        "rewards": [{"kind": "length", "min_words": 1, "max_words": 3}],
        "output_dir": str(tmp_path / "out"), "progress": False}))
    m = evaluate.run(cfg)
    assert m["perplexity_scorer"] == "before" and "judges" not in m
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    lora, _ = evaluate.load_entry(cfg.models[1].model, lora_adapter, torch.device("cpu"))
    _, ids = evaluate.generate_samples(lora, tok, prompts, GenerationConfig(**gen), seed=3, progress=False, desc="x")
    nll, count = 0.0, 0
    for p, r in zip(prompts, ids):  # a plain forward of the scorer (the base) over prompt + the lora's tokens
        full = tok(p)["input_ids"] + r
        with torch.no_grad():
            lp = torch.log_softmax(base(torch.tensor([full])).logits[0].double(), -1)  # (T, V)
        start = len(full) - len(r)
        nll -= sum(float(lp[t - 1, full[t]]) for t in range(start, len(full)))
        count += len(r)
    assert m["perplexity"]["lora"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    ratio = m["perplexity_ratio"]["lora"]
    assert ratio["estimate"] == pytest.approx(m["perplexity"]["lora"] / m["perplexity"]["before"], rel=1e-6)
    assert ratio["low"] <= ratio["estimate"] <= ratio["high"]
    cut = [float(len(r) == 6 and r[-1] != tok.eos_token_id) for r in ids]
    assert m["cut_at_cap"]["lora"] == pytest.approx(np.mean(cut))
    # with the scorer as the KL reference, the reference's pass of the sampled KL gives the same perplexity
    cfg.kl_reference, cfg.output_dir = "before", str(tmp_path / "out2")
    m2 = evaluate.run(cfg)
    assert m2["perplexity"] == pytest.approx(m["perplexity"], rel=1e-9) and m2["kl"]["lora"] > 0


@pytest.mark.unit
def test_wordlist_and_classifier_judges(tmp_path, tiny_dir):
    from rlhfkit.rewards import EvalJudgeConfig, build_judge, classifier_logits
    from rlhfkit.tiny import save_tiny

    wl = build_judge(EvalJudgeConfig(kind="wordlist"))
    # whole words only ('classic' holds no listed word), case and punctuation ignored, multi-word entries
    assert wl(["p"] * 4, ["What the HELL, you moron!", "a classic idea", "Shit.", "2 girls 1 cup"]) == [1.0, 0.0, 1.0, 1.0]
    bert = save_tiny("bert", tiny_dir / "judge-bert")
    texts = ["the cat", "a dog runs", "hello"]
    clf = build_judge(EvalJudgeConfig(kind="classifier", model=bert, output="probability"))
    logits = classifier_logits(bert, texts)[:, 0]  # one-logit head: probability = sigmoid(logit)
    assert clf(["p"] * 3, texts) == pytest.approx(torch.sigmoid(logits).tolist(), abs=1e-6)
    raw = build_judge(EvalJudgeConfig(kind="classifier", model=bert, output="logit"))
    assert raw(["p"] * 3, texts) == pytest.approx(logits.tolist(), abs=1e-6)
    assert EvalJudgeConfig(kind="reward_model", model=bert).lower_is_better is False
    assert EvalJudgeConfig(kind="classifier", model=bert).lower_is_better is True
