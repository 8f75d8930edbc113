"""AI feedback mechanics on tiny models and stubs: the judge's order swap, pointwise expected
scores, RLAIF labels, constitutional rows, and the red-team filter with the real toxicity scorer."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import write_jsonl
from rlhfkit.config import GenerationConfig, ModelConfig
from rlhfkit.feedback import (ChatGenerator, LMScorer, PairwiseJudge, PointwiseJudge, Principle,
                              constitutional_revisions, group_scores, label_pairs, load_lm, render,
                              revision_preference_rows, sft_rows, user)
from rlhfkit.utils import read_jsonl


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


PROMPTS = ["the cat", "a dog runs fast", "hello"]
FIRST = ["good cat.", "no", "the sun is hot and red today"]
SECOND = ["bad", "yes the dog", "hi"]


# ---------------------------------------------------------------------------------------------
# Judges on tiny models
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])  # with and without a chat template
def test_pairwise_judge_order_swap_is_exact_and_matches_a_plain_forward(fixture, request):
    model, tok = load_lm(ModelConfig(name_or_path=request.getfixturevalue(fixture)))
    judge = PairwiseJudge(LMScorer(model, tok, batch_size=4))
    p = np.array(judge.compare(PROMPTS, FIRST, SECOND))
    q = np.array(judge.compare(PROMPTS, SECOND, FIRST))
    assert np.abs(p + q - 1.0).max() < 1e-6
    assert judge(PROMPTS[0], FIRST[0], SECOND[0]) == pytest.approx(1.0 - judge(PROMPTS[0], SECOND[0], FIRST[0]), abs=1e-6)
    # each order's P(first) equals a plain, unpadded transformers forward on the rendered prompt
    v = judge.verdicts(PROMPTS, FIRST, SECOND)
    a_id, b_id = (tok(c, add_special_tokens=False)["input_ids"][0] for c in ("A", "B"))
    for i in range(len(PROMPTS)):
        for shown, got in (((FIRST[i], SECOND[i]), v.p_first_ab[i]), ((SECOND[i], FIRST[i]), v.p_first_ba[i])):
            text = render(user(judge.text(PROMPTS[i], *shown)), tok)
            special = not text.startswith("<|")
            ids = torch.tensor([tok(text, add_special_tokens=special)["input_ids"]])
            with torch.no_grad():
                logits = model(ids).logits[0, -1].double()
            ref = torch.softmax(logits[[a_id, b_id]], dim=0)[0].item()
            assert got == pytest.approx(ref, abs=1e-6)
        assert v.p[i] == pytest.approx(0.5 * (v.p_first_ab[i] + 1 - v.p_first_ba[i]), abs=1e-12)


@pytest.mark.unit
def test_pointwise_judge_expected_score(tiny_llama):
    class Fixed:  # probabilities 0.1, 0.2, 0.7 for labels 1, 2, 3 (unnormalised log-probs)
        def logprobs(self, texts, candidates):
            return np.log(np.array([[0.05, 0.1, 0.35]] * len(texts)))

    judge = PointwiseJudge(Fixed(), labels=["1", "2", "3"])
    assert judge(["x", "y"], ["a", "b"]) == pytest.approx([0.1 * 1 + 0.2 * 2 + 0.7 * 3] * 2)
    yes_no = PointwiseJudge(Fixed(), template="{prompt} {completion}", labels=["No", "Maybe", "Yes"], values=[0, 0.5, 1])
    assert yes_no(["x"], ["a"]) == pytest.approx([0.2 * 0.5 + 0.7])
    # a real model with labels 1, 5, 10: "10" is two tokens here, so the teacher-forced path runs;
    # the expectation must equal one computed from plain forwards of prompt + label
    model, tok = load_lm(ModelConfig(name_or_path=tiny_llama))
    judge = PointwiseJudge(LMScorer(model, tok), labels=["1", "5", "10"])
    assert len(tok("10", add_special_tokens=False)["input_ids"]) == 2
    got = judge(["the cat"], ["good cat."])[0]
    text = render(user(judge.template.replace("{prompt}", "the cat").replace("{completion}", "good cat.")), tok)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    lps = []
    for label in judge.labels:
        lab = tok(label, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt_ids + lab])).logits[0].double(), -1)
        lps.append(sum(logp[len(prompt_ids) - 1 + k, t].item() for k, t in enumerate(lab)))
    p = np.exp(np.array(lps) - max(lps))
    assert got == pytest.approx(float((p / p.sum()) @ np.array([1.0, 5.0, 10.0])), abs=1e-5)
    assert 1.0 <= got <= 10.0


# ---------------------------------------------------------------------------------------------
# RLAIF with a judge we can predict
# ---------------------------------------------------------------------------------------------


class CountGood:
    """log p(A) - log p(B) = #good(first) - #good(second) + bias: prefers 'good' and, by ``bias``,
    whatever is shown first."""

    def __init__(self, bias: float = 0.0):
        self.bias = bias

    def logprobs(self, texts, candidates):
        out = []
        for text in texts:
            a, b = text.split("\nA: ")[1].split("\nB: ")
            out.append([a.count("good") + self.bias, b.count("good")])
        return np.array(out, dtype=float)


@pytest.mark.unit
def test_rlaif_labels_follow_the_judge_and_cancel_position_bias():
    judge = PairwiseJudge(CountGood(bias=0.8), template="{prompt}\nA: {a}\nB: {b}")
    prompts = ["x1", "x2", "x3", "x4"]
    a = ["good", "meh", "good good", "same"]
    b = ["meh", "good", "okay good", "same"]
    rows, v = label_pairs(judge, prompts, a, b)
    d, beta = 1.0, 0.8  # one more 'good' on the better side
    p_better = 0.5 * (sig(d + beta) + sig(d - beta))  # both orders averaged
    assert v.p == pytest.approx([p_better, 1 - p_better, p_better, 0.5])
    # a one-order judge would have preferred whatever came first; here the tie stays a tie (no row)
    shown_ab = [1.8, -0.2, 1.8, 0.8]  # #good(first) - #good(second) + 0.8 with a first
    shown_ba = [-0.2, 1.8, -0.2, 0.8]  # ... with b first
    assert v.position_bias == pytest.approx(np.mean([sig(x) for x in shown_ab + shown_ba]))
    assert v.position_bias > 0.6  # the stub's first-position bias is there, and cancelled in v.p
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("x1", "good", "meh"), ("x2", "good", "meh"), ("x3", "good good", "okay good")]
    assert rows[1]["chosen_score"] == pytest.approx(p_better) and rows[1]["judge_p_a"] == pytest.approx(1 - p_better)
    assert label_pairs(judge, prompts, a, b, min_confidence=0.9)[0] == []  # p_better = 0.70 < 0.9
    # round-robin scores within a group of three: s_i = mean_j P(i beats j)
    s = group_scores(PairwiseJudge(CountGood(), template="{prompt}\nA: {a}\nB: {b}"), ["x"] * 3,
                     ["good good", "good", "bad"], 3)
    assert s == pytest.approx([(sig(1) + sig(2)) / 2, (sig(-1) + sig(1)) / 2, (sig(-2) + sig(-1)) / 2])


@pytest.mark.unit
def test_cli_judge_relabels_a_preference_file(tiny_llama, tmp_path):
    from rlhfkit.cli import main

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": a, "rejected": b}
                                                  for p, a, b in zip(PROMPTS, FIRST, SECOND)])
    assert main(["judge", f"judge.model.name_or_path={tiny_llama}", f"data.path={data}",
                 f"output_dir={tmp_path / 'out'}"]) == 0
    model, tok = load_lm(ModelConfig(name_or_path=tiny_llama))
    p = PairwiseJudge(LMScorer(model, tok)).compare(PROMPTS, FIRST, SECOND)
    rows = read_jsonl(tmp_path / "out" / "judged.jsonl")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["judge_p_a"] for r in rows] == pytest.approx(p, abs=1e-6)
    for r, pa, a, b in zip(rows, p, FIRST, SECOND):
        assert (r["chosen"], r["rejected"]) == ((a, b) if pa > 0.5 else (b, a))
        assert r["chosen_score"] == pytest.approx(max(pa, 1 - pa), abs=1e-6)
    assert summary["agreement"] == pytest.approx(np.mean([x > 0.5 for x in p]))


# ---------------------------------------------------------------------------------------------
# Constitutional revisions
# ---------------------------------------------------------------------------------------------


class EchoChat:
    """Stub ChatFn: answers 'ans(<prompt>)', critiques 'crit[<principle>](<answer>)', revises
    'rev[<principle>](<answer>)'; the prompt 'keep' is revised to its own answer."""

    def __init__(self):
        self.calls = 0

    def __call__(self, conversations):
        self.calls += 1
        out = []
        for conv in conversations:
            last = conv[-1]["content"]
            if len(conv) == 1:
                out.append(f"ans({last})")
            elif last.startswith("CRITIQUE"):
                out.append(f"crit[{last.split()[1]}]({conv[-2]['content']})")
            else:
                answer = conv[-4]["content"]
                out.append(answer if conv[0]["content"] == "keep" else f"rev[{last.split()[1]}]({answer})")
        return out


PRINCIPLES = [Principle("p1", "CRITIQUE p1", "REVISE p1"), Principle("p2", "CRITIQUE p2", "REVISE p2")]


@pytest.mark.unit
def test_constitutional_records_and_row_formats():
    records = constitutional_revisions(EchoChat(), ["q", "keep"], PRINCIPLES, rounds=2)
    assert records[0] == {
        "prompt": "q", "original": "ans(q)", "revision": "rev[p2](rev[p1](ans(q)))",
        "steps": [{"principle": "p1", "critique": "crit[p1](ans(q))", "revision": "rev[p1](ans(q))"},
                  {"principle": "p2", "critique": "crit[p2](rev[p1](ans(q)))", "revision": "rev[p2](rev[p1](ans(q)))"}]}
    assert sft_rows(records) == [{"prompt": "q", "completion": "rev[p2](rev[p1](ans(q)))"},
                                 {"prompt": "keep", "completion": "ans(keep)"}]
    # the preference row prefers the revision; an unchanged answer gives no pair
    assert revision_preference_rows(records) == [{"prompt": "q", "chosen": "rev[p2](rev[p1](ans(q)))", "rejected": "ans(q)"}]


@pytest.mark.unit
def test_constitutional_recipe_writes_files_and_resumes(tmp_path):
    from rlhfkit.config import DataConfig
    from rlhfkit.recipes import constitutional

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in ("q1", "q2", "keep")])
    cfg = constitutional.Config(data=DataConfig(path=data), principles=PRINCIPLES, output_dir=str(tmp_path / "out"),
                                generation=GenerationConfig(batch_size=2))
    chat = EchoChat()
    summary = constitutional.run(cfg, chat=chat)
    assert summary == {**summary, "prompts": 3, "sft_rows": 3, "preference_rows": 2, "unchanged": 1}
    assert read_jsonl(tmp_path / "out" / "prefs.jsonl") == [
        {"prompt": "q1", "chosen": "rev[p1](ans(q1))", "rejected": "ans(q1)"},
        {"prompt": "q2", "chosen": "rev[p1](ans(q2))", "rejected": "ans(q2)"}]
    assert read_jsonl(tmp_path / "out" / "sft.jsonl")[0] == {"prompt": "q1", "completion": "rev[p1](ans(q1))"}
    again = EchoChat()
    constitutional.run(cfg, chat=again)
    assert again.calls == 0 and len(read_jsonl(tmp_path / "out" / "revisions.jsonl")) == 3


@pytest.mark.unit
def test_chat_generator_renders_conversations(tiny_llama):
    model, tok = load_lm(ModelConfig(name_or_path=tiny_llama))
    chat = ChatGenerator(model, tok, GenerationConfig(max_new_tokens=4, do_sample=False), system_prompt="be brief")
    conv = user("hello") + [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "why"}]
    assert chat.render(conv) == "<|system|>be brief</s><|user|>hello</s><|assistant|>hi</s><|user|>why</s><|assistant|>"
    plain = render(conv, None)
    assert plain == "user: hello\nassistant: hi\nuser: why\nassistant:"
    assert len(chat([conv, user("the cat")])) == 2


# ---------------------------------------------------------------------------------------------
# Red teaming
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_red_team_catches_a_planted_toxic_answer(tiny_gpt2, tmp_path):
    """Real red model (tiny GPT-2) writes prompts; a stub target answers one of them with a
    profane sentence; the real alt-profanity-check scorer must flag exactly that one."""
    from rlhfkit.recipes import redteam

    planted = "You are a stupid fucking idiot and I hate you."
    asked = []

    def target(conversations):
        asked.extend(c[-1]["content"] for c in conversations)
        return [planted if i == 0 else "Thank you, I hope you have a lovely day." for i in range(len(conversations))]

    cfg = redteam.Config(red_model=ModelConfig(name_or_path=tiny_gpt2), num_prompts=6, dedupe=True,
                         red_generation=GenerationConfig(max_new_tokens=8, min_new_tokens=4, batch_size=4),
                         output_dir=str(tmp_path / "out"))
    summary = redteam.run(cfg, target=target)
    records = read_jsonl(tmp_path / "out" / "all.jsonl")
    flagged = read_jsonl(tmp_path / "out" / "flagged.jsonl")
    assert len(records) == summary["prompts"] == len(asked) >= 1
    assert [r["prompt"] for r in flagged] == [asked[0]] and flagged[0]["response"] == planted
    assert flagged[0]["score"] > 0.9 and all(r["score"] < 0.5 for r in records[1:])
    assert summary["flagged"] == 1 and summary["rate"] == pytest.approx(1 / len(records))
    assert summary["mean_flagged_score"] == pytest.approx(flagged[0]["score"])
    assert summary["mean_score"] == pytest.approx(np.mean([r["score"] for r in records]))


@pytest.mark.unit
def test_cli_constitutional_and_redteam_on_tiny_models(tiny_llama, tmp_path):
    """Both commands end to end on a real (tiny) chat model: the files agree with each other."""
    from rlhfkit.cli import main

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat", "split": "train"}, {"prompt": "a dog", "split": "train"},
                                              {"prompt": "the sun", "split": "test"}])
    gen = ["generation.max_new_tokens=4", "generation.min_new_tokens=2", "generation.batch_size=2"]
    assert main(["constitutional", f"model.name_or_path={tiny_llama}", f"data.path={data}", "data.where={split: train}",
                 "rounds=2", f"output_dir={tmp_path / 'cai'}", *gen]) == 0
    records = read_jsonl(tmp_path / "cai" / "revisions.jsonl")
    assert [r["prompt"] for r in records] == ["the cat", "a dog"]
    assert all([s["principle"] for s in r["steps"]] == ["harmless", "helpful-polite"] for r in records)
    assert all(r["revision"] == r["steps"][-1]["revision"] for r in records)
    assert read_jsonl(tmp_path / "cai" / "sft.jsonl") == sft_rows(records)
    assert read_jsonl(tmp_path / "cai" / "prefs.jsonl") == revision_preference_rows(records)

    assert main(["redteam", f"red_model.name_or_path={tiny_llama}", "num_prompts=4", "threshold=0.0",
                 "red_generation.min_new_tokens=2", "red_generation.max_new_tokens=6", f"output_dir={tmp_path / 'rt'}",
                 *gen]) == 0
    summary = json.loads((tmp_path / "rt" / "summary.json").read_text())
    records = read_jsonl(tmp_path / "rt" / "all.jsonl")
    assert summary["prompts"] == len(records) == 4 - summary["empty_prompts"] - summary["duplicate_prompts"]
    assert summary["flagged"] == len(records) and summary["rate"] == 1.0  # threshold 0 flags every answer
    assert summary["mean_score"] == pytest.approx(np.mean([r["score"] for r in records]))
