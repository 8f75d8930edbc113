"""Reward functions: fixed texts with values worked out by hand or checked against a direct forward."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from rlhfkit.config import ConfigError, RewardConfig, UserError
from rlhfkit.rewards.toxicity import _onnx_set_locale
from rlhfkit.rewards import (
    Classifier, Composite, Gibberish, LabelMatch, Length, PythonReward, ReferenceNormalized, RewardModel,
    Sentiment, TokenFrequency, Toxicity, build_reward, gibberish_label, gibberish_parts,
    gibberish_score, join_prompt_completion, preference_length_reward, reward_from_config, validate_reward,
    vader_label,
)

pytestmark = pytest.mark.unit

PROFANE = "you are a fucking idiot, shut the fuck up"
POLITE = "Thank you so much for the lovely gift, it was very thoughtful of you."
CLEAN = "The committee met on Tuesday and agreed to publish the report before the end of the month."
NOISE = "xkq zvbn plmo qazx wrtp fghj"
HERE = Path(__file__).parent

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a cat dog sat on mat good bad movie i love hate this it was great awful very and not "
    "weather today is nice story end summary of dialogue"
).split()


def tiny_classifier(root: Path, labels: list[str], seed: int = 0) -> str:
    """A random 1-layer BERT classifier with a word-level vocabulary, saved like a hub model."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer(vocab=str(root / "vocab.txt"), model_max_length=64)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=len(labels), initializer_range=0.5,
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    out = root / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def direct_logits(path: str, texts: list[str], max_length: int = 64, side: str = "right") -> torch.Tensor:
    """Reference: one unpadded transformers forward per text."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.truncation_side = side
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        rows = [model(**tok(t, truncation=True, max_length=max_length, return_tensors="pt")).logits[0]
                for t in texts]
    return torch.stack(rows)  # (N, C)


# ---------------------------------------------------------------------------------- toxicity


def test_toxicity_profanity_check():
    p = Toxicity(backend="profanity_check", invert=False)(["", ""], [PROFANE, POLITE])
    assert p[0] > 0.8 and p[1] < 0.2
    r = Toxicity(backend="profanity_check")(["", ""], [PROFANE, POLITE])  # invert=True by default
    assert r == pytest.approx([1 - p[0], 1 - p[1]], abs=1e-12)


def test_toxicity_hatesonar():
    p = Toxicity(backend="hatesonar", invert=False)(["", "", ""], [PROFANE, POLITE, PROFANE.upper()])
    # HateSonar's "neither" class is the minority of its tweet training set, so even polite text keeps
    # p(hate) + p(offensive) around 0.35; a profane insult is close to 1.
    assert p[0] > 0.9
    assert p[1] < 0.5 and p[0] - p[1] > 0.5
    # the (locale-patched) StringNormalizer lower-cases: upper-case text scores the same
    assert p[2] == pytest.approx(p[0], abs=1e-6)
    r = Toxicity(backend="hatesonar", invert=True)([""], [POLITE])
    assert r[0] == pytest.approx(1 - p[1], abs=1e-6)


def test_onnx_locale_patch_adds_one_attribute_per_string_normalizer():
    from rlhfkit.assets import package_dir

    data = (package_dir("hatesonar") / "model" / "model.onnx").read_bytes()
    assert b"locale" not in data
    patched = _onnx_set_locale(data, "C.UTF-8")
    # the attribute is name "locale" (field 1), s "C.UTF-8" (field 4), type STRING (field 20 = 3)
    attr = b"\x0a\x06locale" + b"\x22\x07C.UTF-8" + b"\xa0\x01\x03"
    assert patched.count(attr) == 1 and patched.count(b"locale") == 1
    assert len(patched) > len(data)


# ---------------------------------------------------------------------------------- sentiment / labels


def test_sentiment_vader():
    r = Sentiment()(["", ""], ["I love this, wonderful!", "This is terrible, I hate it."])
    assert r[0] > 0.5 and r[1] < -0.5
    assert vader_label("I love this, wonderful!") == "positive"
    assert vader_label("The meeting is on Tuesday.") == "neutral"
    assert vader_label("This is terrible, I hate it.") == "negative"


def test_label_match_vader():
    fn = LabelMatch("target_label")
    texts = ["I love this, wonderful!", "I love this, wonderful!", "The meeting is on Tuesday.",
             "This is terrible, I hate it."]
    r = fn([""] * 4, texts, target_label=["positive", "Negative", "neutral", "negative"])
    assert r == [1.0, 0.0, 1.0, 1.0]
    with pytest.raises(UserError, match=r"row 1, column 'target_label'.*'joy'"):
        fn(["", ""], texts[:2], target_label=["positive", "joy"])
    with pytest.raises(UserError, match="needs the column 'target_label'"):
        fn([""], texts[:1], emotion=["positive"])


def test_label_match_with_classifier_is_target_probability(tmp_path):
    labels = ["negative", "neutral", "positive"]
    path = tiny_classifier(tmp_path, labels, seed=1)
    texts = ["i love this movie", "the cat sat on the mat", "awful story"]
    targets = ["positive", "NEUTRAL", "negative"]
    r = LabelMatch("target", model=path, device="cpu")([""] * 3, texts, target=targets)
    probs = direct_logits(path, texts).softmax(-1)
    assert r == pytest.approx([probs[0, 2].item(), probs[1, 1].item(), probs[2, 0].item()], abs=1e-5)
    assert LabelMatch("target", model=path, device="cpu").labels(texts) == [labels[i] for i in probs.argmax(-1)]
    with pytest.raises(UserError, match="row 0, column 'target'.*no label 'joy'"):
        LabelMatch("target", model=path, device="cpu")([""], texts[:1], target=["joy"])


# ---------------------------------------------------------------------------------- length / frequency


@pytest.mark.parametrize("n, expected", [
    (0, -0.9),         # d_min = -1, d_max = -1: neither |d_min| < 1 nor > 1 -> d_max * 0.9
    (3, -0.00004),     # d_min = -0.4 -> -0.4e-4
    (5, 0.0),          # d_min = 0
    (10, -0.45),       # d_min = 1 exactly -> d_max * 0.9 = -0.5 * 0.9
    (12, 10.0),        # |1.4 + -0.4| * 10
    (30, 55.0),        # d_min = 5, d_max = 0.5: |5 + 0.5| * 10 (second branch, literally)
    (40, 0.9),         # d_max = 1 -> 1 * 0.9
    (50, 1.35),        # d_max = 1.5 -> 1.5 * 0.9
])
def test_length_preference_formula(n, expected):
    assert preference_length_reward(n) == pytest.approx(expected, abs=1e-12)
    assert Length()([""], [" ".join(["w"] * n)]) == pytest.approx([expected], abs=1e-12)


def test_length_target_range():
    fn = Length(min_words=5, max_words=10)
    texts = [" ".join(["w"] * n) for n in (0, 2, 5, 10, 15, 20, 25)]
    assert fn([""] * 7, texts) == pytest.approx([0.0, 0.4, 1.0, 1.0, 0.5, 0.0, 0.0])
    assert Length(min_words=4)([""], [" ".join(["w"] * 100)]) == [1.0]
    assert Length(max_words=4)(["", ""], ["", "a b c d e f"]) == pytest.approx([1.0, 0.5])
    with pytest.raises(ConfigError, match="min_words"):
        Length(min_words=10, max_words=5)


def test_copy_reward_is_minus_the_copied_ngram_share():
    prompt = "He said: I hope that you die, you fool."
    fn = build_reward([{"kind": "copy", "ngram": 4}])
    # 5 words -> 2 four-grams, both in the prompt; 6 words -> 3, of which "that you die now" is not;
    # a 3-word answer has no 4-gram; nothing quoted
    answers = ["I hope that you die.", "i HOPE that you die now", "you fool!", "Please be kind to others."]
    assert fn.score([prompt] * 4, answers)[0] == pytest.approx([-1.0, -2 / 3, 0.0, 0.0])
    assert build_reward([{"kind": "copy", "ngram": 2}])([prompt], ["you fool!"]) == [-1.0]
    with pytest.raises(ConfigError, match="ngram"):
        build_reward([{"kind": "copy", "ngram": 0}])


def test_relevance_reward_is_the_cosine_of_what_is_left_after_the_quotes():
    from rlhfkit.metrics import embed

    prompt = "Reply to this: the band played loud guitar music all night long"
    source = "the band played loud guitar music all night long"
    fn = build_reward([{"kind": "relevance", "source_column": "source"}])
    answers = ["the band played loud guitar music",  # all quoted: nothing left, 0
               "I enjoyed the concert and the guitars",  # nothing quoted: the whole answer
               "the band played loud and I went to sleep",  # "the band played loud" (4 words) is taken out
               "Stocks fell sharply today."]
    got = fn([prompt] * 4, answers, source=[source] * 4)
    e = embed([source, "I enjoyed the concert and the guitars", "and i went to sleep", "Stocks fell sharply today."])
    assert got == pytest.approx([0.0, float(e[1] @ e[0]), float(e[2] @ e[0]), float(e[3] @ e[0])], abs=1e-5)
    assert got[1] > got[3] + 0.2  # on topic beats off topic
    with pytest.raises(ConfigError, match="needs 'source_column'"):
        build_reward([{"kind": "relevance"}])
    with pytest.raises(UserError, match="needs the column 'source'"):
        fn([prompt], ["hi"], topic=["x"])


def test_token_frequency():
    fn = TokenFrequency("cat")
    assert fn(["", "", ""], ["cat dog cat mat", "", "Cat cats"]) == [0.5, 0.0, 0.0]


# ---------------------------------------------------------------------------------- gibberish


def test_gibberish_offline_scores():
    r = Gibberish()([""] * 4, [CLEAN, "I don't think it's going to rain, but we'll see.", NOISE,
                               "asdkjh qwpeoiru zxmcnv"])
    assert r[0] > 0.8 and r[1] > 0.8
    assert r[2] < 0.3 and r[3] < 0.3
    # a loop of dictionary words: 8 tokens -> 6 trigrams, 1 distinct -> repeat fraction 5/6
    assert gibberish_parts("the the the the the the the the") == (1.0, pytest.approx(5 / 6))
    assert gibberish_score("the the the the the the the the") == pytest.approx(1 / 6)
    # numbers and punctuation are ignored; 3 words of which 2 are in the dictionary
    assert gibberish_parts("cat 42 !!! qzxv dog") == (pytest.approx(2 / 3), 0.0)
    assert gibberish_score("") == 0.0


def test_gibberish_label():
    label, conf = gibberish_label(CLEAN)
    assert label == "clean" and conf >= 0.8
    assert gibberish_label(NOISE) == ("noise", 1.0)
    assert gibberish_label("the the the the the the the the") == ("word salad", pytest.approx(5 / 6))


def test_gibberish_with_hub_style_classifier(tmp_path):
    labels = ["clean", "mild gibberish", "word salad", "noise"]
    path = tiny_classifier(tmp_path, labels, seed=2)
    texts = ["the cat sat on the mat", "mat mat the the", "zzz qqq"]
    fn = Gibberish(model=path, device="cpu")
    probs = direct_logits(path, texts).softmax(-1)
    assert fn([""] * 3, texts) == pytest.approx(probs[:, 0].tolist(), abs=1e-5)
    got = fn.labels(texts)
    assert [g[0] for g in got] == [labels[i] for i in probs.argmax(-1)]
    assert [g[1] for g in got] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)


# ---------------------------------------------------------------------------------- HF classifier / RM


def test_classifier_matches_direct_forward(tmp_path):
    path = tiny_classifier(tmp_path, ["nothate", "hate"])
    texts = ["good", "i love this movie and the story was great", "bad movie", "the weather today is nice"]
    ref = direct_logits(path, texts)
    logit = Classifier(path, label="nothate", device="cpu", batch_size=3)([""] * 4, texts)
    assert logit == pytest.approx(ref[:, 0].tolist(), abs=1e-5)
    prob = Classifier(path, label=1, output="probability", device="cpu")([""] * 4, texts)
    assert prob == pytest.approx(ref.softmax(-1)[:, 1].tolist(), abs=1e-5)
    with pytest.raises(UserError, match="no label 'toxic'"):
        Classifier(path, label="toxic", device="cpu")([""], ["good"])
    with pytest.raises(UserError, match="choose one with 'label'"):
        Classifier(path, device="cpu")([""], ["good"])


def test_classifier_truncation_and_prompt_text(tmp_path):
    path = tiny_classifier(tmp_path, ["a", "b"], seed=3)
    long = " ".join(["the cat sat on the mat"] * 10)  # 60 words
    got = Classifier(path, label="a", max_length=8, device="cpu")([""], [long])
    assert got == pytest.approx([direct_logits(path, [long], max_length=8)[0, 0].item()], abs=1e-5)
    joined = Classifier(path, label="b", text="prompt+completion", device="cpu")(["i love"], ["this movie"])
    assert joined == pytest.approx([direct_logits(path, ["i love this movie"])[0, 1].item()], abs=1e-5)


def test_reward_model_normalized(tmp_path):
    path = tiny_classifier(tmp_path, ["LABEL_0"], seed=4)
    (Path(path) / "reward_stats.json").write_text(json.dumps({"mean": 0.25, "std": 2.0}))
    prompts = ["summary of dialogue:", "i love"]
    completions = ["the cat sat on the mat", "this movie"]
    raw = direct_logits(path, ["summary of dialogue: the cat sat on the mat", "i love this movie"])[:, 0]
    assert RewardModel(path, device="cpu")(prompts, completions) == pytest.approx(raw.tolist(), abs=1e-5)
    norm = RewardModel(path, normalize=True, device="cpu")(prompts, completions)
    assert norm == pytest.approx(((raw - 0.25) / 2.0).tolist(), abs=1e-5)
    # long inputs keep the completion: truncated from the left
    long_prompt = " ".join(["the weather today is nice"] * 20)
    got = RewardModel(path, max_length=8, device="cpu")([long_prompt], ["good movie"])
    ref = direct_logits(path, [long_prompt + " good movie"], max_length=8, side="left")[0, 0].item()
    assert got == pytest.approx([ref], abs=1e-5)


def test_reward_model_errors(tmp_path):
    path = tiny_classifier(tmp_path / "rm", ["LABEL_0"])
    with pytest.raises(UserError, match="reward_stats.json: not found"):
        RewardModel(path, normalize=True, device="cpu")([""], ["good"])
    multi = tiny_classifier(tmp_path / "multi", ["x", "y"])
    with pytest.raises(UserError, match="has 2 outputs"):
        RewardModel(multi, device="cpu")([""], ["good"])
    with pytest.raises(UserError, match="cannot load classifier"):
        Classifier(str(tmp_path / "missing"), device="cpu")([""], ["good"])


def test_join_prompt_completion():
    assert join_prompt_completion("Q:", "A") == "Q: A"
    assert join_prompt_completion("Q:\n", "A") == "Q:\nA"
    assert join_prompt_completion("Q:", " A") == "Q: A"
    assert join_prompt_completion("", "A") == "A"


# ---------------------------------------------------------------------------------- combinators


def _const(values):
    return lambda prompts, completions, **columns: list(values)


def test_composite_weighted_sum_plus_bias():
    a, b, c = [0.9, 0.1], [12.0, 3.0], [0.5, 1.0]
    comp = Composite([("label", 0.4, _const(a)), ("length", 0.25, _const(b)), ("gibberish", 0.35, _const(c))],
                     bias=0.001)
    total, parts = comp.score(["", ""], ["x", "y"])
    # 0.4*0.9 + 0.25*12 + 0.35*0.5 + 0.001 = 0.36 + 3 + 0.175 + 0.001 = 3.536
    # 0.4*0.1 + 0.25*3 + 0.35*1.0 + 0.001 = 0.04 + 0.75 + 0.35 + 0.001 = 1.141
    assert total == pytest.approx([3.536, 1.141], abs=1e-12)
    assert parts == {"label": a, "length": b, "gibberish": c}
    assert comp(["", ""], ["x", "y"]) == total
    with pytest.raises(ConfigError, match="distinct"):
        Composite([("x", 1.0, _const(a)), ("x", 1.0, _const(b))])


def test_reference_normalized_with_stub_base():
    def n_words(prompts, completions, **columns):
        return [len(c.split()) for c in completions]

    fn = ReferenceNormalized(n_words, "summary")
    r = fn(["", ""], ["one two three", "one"], summary=["a b", "a b c d"])
    assert r == [1.0, -3.0]
    with pytest.raises(UserError, match="needs the column 'summary'"):
        fn([""], ["x"], reference=["y"])


def test_python_reward_by_module_name(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    fn = PythonReward("reward_fns_example:uses_column")
    assert fn(["p", "p"], ["abc", "hello"], bonus=[1, 2]) == [4, 7]
    by_file = PythonReward(f"{HERE / 'reward_fns_example.py'}:n_chars")
    assert by_file(["", ""], ["abc", ""]) == [3, 0]
    with pytest.raises(UserError, match="cannot import"):
        PythonReward("no_such_module_xyz:f")
    with pytest.raises(UserError, match="has no 'missing'"):
        PythonReward("reward_fns_example:missing")
    with pytest.raises(UserError, match="not callable"):
        PythonReward("reward_fns_example:not_callable")
    with pytest.raises(ConfigError, match="module:function"):
        PythonReward("reward_fns_example")


def test_python_reward_from_working_directory_leaves_sys_path_alone(tmp_path, monkeypatch):
    """A module found only in the working directory imports, and the directory is not left on sys.path."""
    import sys

    (tmp_path / "cwd_reward_mod_xyz.py").write_text("def f(prompts, completions, **kw):\n    return [7.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    before = list(sys.path)
    try:
        fn = PythonReward("cwd_reward_mod_xyz:f")
        assert fn(["p"], ["c"]) == [7.0]
        assert sys.path == before
        assert str(tmp_path) not in sys.path
    finally:
        sys.modules.pop("cwd_reward_mod_xyz", None)


@pytest.mark.parametrize("function, message", [
    ("wrong_count", "reward 'python:reward_fns_example:wrong_count' returned 3 values for 4 completions"),
    ("returns_nan", "reward 'python:reward_fns_example:returns_nan' returned nan for completion 0"),
    ("returns_inf", "reward 'python:reward_fns_example:returns_inf' returned inf for completion 3"),
    ("returns_text", "reward 'python:reward_fns_example:returns_text' returned a non-number for completion 0"),
])
def test_bad_reward_outputs_raise_user_error(monkeypatch, function, message):
    monkeypatch.syspath_prepend(str(HERE))
    reward = build_reward(RewardConfig(kind="python", function=f"reward_fns_example:{function}"))
    with pytest.raises(UserError) as err:
        reward([""] * 4, ["a", "b", "c", "d"])
    assert str(err.value).startswith(message)


def test_validate_reward_accepts_arrays_and_tensors():
    assert validate_reward(lambda p, c: np.array([1, 2]), "np")(["", ""], ["a", "b"]) == [1.0, 2.0]
    assert validate_reward(lambda p, c: torch.tensor([0.5, 1.5]), "t")(["", ""], ["a", "b"]) == [0.5, 1.5]
    assert validate_reward(lambda p, c: [torch.tensor(3.0), np.float32(2)], "l")(["", ""], ["a", "b"]) == [3.0, 2.0]
    with pytest.raises(UserError, match="reward 'composite-part' returned 1 values for 2 completions"):
        Composite([("composite-part", 1.0, lambda p, c: [1.0])])(["", ""], ["a", "b"])


def test_build_reward_from_configs(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    cfgs = [
        RewardConfig(kind="token_frequency", token="yes", weight=2.0),
        {"kind": "length", "min_words": 2, "max_words": 3, "weight": 0.5},
        RewardConfig(kind="python", function="reward_fns_example:n_chars", weight=0.01, name="chars"),
        RewardConfig(kind="length", weight=-1.0),
    ]
    reward = build_reward(cfgs, bias=0.1)
    completions = ["yes no", "yes yes yes yes"]  # 2 and 4 words; 6 and 15 characters
    total, parts = reward.score(["", ""], completions)
    assert list(parts) == ["token_frequency", "length", "chars", "length_2"]
    assert parts["token_frequency"] == [0.5, 1.0]
    assert parts["length"] == pytest.approx([1.0, 1 - 1 / 3])
    assert parts["chars"] == [6.0, 15.0]
    assert parts["length_2"] == pytest.approx([-0.00006, -0.00002])  # d_min = -0.6, -0.2
    # 0.1 + 2*0.5 + 0.5*1 + 0.01*6 - (-0.00006) = 1.66006
    # 0.1 + 2*1.0 + 0.5*(2/3) + 0.01*15 - (-0.00002) = 2.58335333...
    assert total == pytest.approx([1.66006, 0.1 + 2 + 1 / 3 + 0.15 + 0.00002], abs=1e-12)


def test_reference_normalized_from_config():
    cfg = RewardConfig(kind="reference_normalized", reference_column="summary",
                       base={"kind": "token_frequency", "token": "good"})
    fn = reward_from_config(cfg)
    assert fn(["", ""], ["good good", "bad"], summary=["good bad", "good"]) == [0.5, -1.0]
    with pytest.raises(ConfigError, match="unknown key 'reward.base.tokn'"):
        reward_from_config(RewardConfig(kind="reference_normalized", reference_column="s",
                                        base={"kind": "token_frequency", "tokn": "x"}))
    with pytest.raises(ConfigError, match="needs 'reference_column'"):
        reward_from_config(RewardConfig(kind="reference_normalized", base={"kind": "sentiment"}))


def test_classifier_from_config(tmp_path):
    path = tiny_classifier(tmp_path, ["nothate", "hate"], seed=5)
    cfg = RewardConfig(kind="classifier", model=path, label="nothate", output="probability")
    got = build_reward(cfg, device="cpu")([""], ["bad movie"])
    assert got == pytest.approx([direct_logits(path, ["bad movie"]).softmax(-1)[0, 0].item()], abs=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("section,key", [
    ({"kind": "copy", "batch_size": 8}, "batch_size"),
    ({"kind": "relevance", "source_column": "source", "max_length": 128}, "max_length"),
    ({"kind": "length", "label": "toxic"}, "label"),
    ({"kind": "classifier", "model": "m", "invert": False}, "invert"),
    ({"kind": "toxicity", "ngram": 3}, "ngram"),
])
def test_a_key_another_reward_kind_reads_is_refused(section, key):
    """A key the kind would ignore is an error that names the key, its kinds and this kind."""
    with pytest.raises(ConfigError, match=f"reward key '{key}' applies to kind .*not '{section['kind']}'"):
        RewardConfig(**section).validate()


@pytest.mark.unit
def test_the_keys_a_reward_kind_reads_are_accepted():
    RewardConfig(kind="classifier", model="m", label="toxic", output="probability", batch_size=8, max_length=64).validate()
    RewardConfig(kind="relevance", source_column="source", ngram=3, model="asset:minilm").validate()
    RewardConfig(kind="copy", ngram=3, weight=2.0, name="quotes").validate()
