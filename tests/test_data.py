"""Data: reading every source format, schema errors that name file/row/column, prompts and chat
templates, preference layouts, over-long policy, collation, packing, batch order, held-out split."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch

from rlhfkit.config import DataConfig, ModelConfig, UserError
from rlhfkit.data import (DataStats, Example, StepBatcher, Table, collate, collate_packed, encode_completion,
                          encode_prompt, load_splits, pack, preference_examples, prompt_examples, read_table,
                          sft_examples, split_shared_prefix, tokenize_pairs)
from rlhfkit.models import load_model, load_tokenizer
from rlhfkit.policy import PolicyModel

# ---------------------------------------------------------------------------------------------
# rows in the schemas of real datasets
# ---------------------------------------------------------------------------------------------

DIALOGSUM = [  # knkarthick/dialogsum: id / dialogue / summary / topic
    {"id": "train_0",
     "dialogue": "#Person1#: Hi, Mr. Smith. I'm Doctor Hawkins. Why are you here today?\n"
                 "#Person2#: I found it would be a good idea to get a check-up.",
     "summary": "Mr. Smith's getting a check-up, and Doctor Hawkins advises him to have one every year.",
     "topic": "get a check-up"},
    {"id": "train_1",
     "dialogue": "#Person1#: Hello Mrs. Parker, how have you been?\n"
                 "#Person2#: Hello Dr. Peters. Just fine thank you. Ricky and I are here for his vaccines.",
     "summary": "Mrs Parker takes Ricky for his vaccines.",
     "topic": "vaccines"},
    {"id": "train_2",
     "dialogue": "#Person1#: Excuse me, did you see a set of keys?\n#Person2#: What kind of keys?",
     "summary": "#Person1# is looking for a set of keys and asks for #Person2#'s help.",
     "topic": "find keys"},
]

TLDR = [  # Reddit TL;DR: post / summary
    {"post": "SUBREDDIT: r/relationships\nTITLE: My friend never replies\nPOST: We used to talk every day.",
     "summary": "friend stopped replying, should I worry?"},
    {"post": "SUBREDDIT: r/personalfinance\nTITLE: First paycheck\nPOST: What should I do with it?",
     "summary": "got my first paycheck, how do I save?"},
]

HH_PREFIX = ("\n\nHuman: What are some good names for a cat?\n\nAssistant: Whiskers, Luna and Milo are popular."
             "\n\nHuman: Which one do you like best?\n\nAssistant:")
HH = [  # Anthropic/hh-rlhf: chosen / rejected full dialogues sharing everything but the last turn
    {"chosen": HH_PREFIX + " I like Luna, it suits a calm cat.",
     "rejected": HH_PREFIX + " I like none of them."},
    {"chosen": "\n\nHuman: Is the sea salty?\n\nAssistant: Yes, sea water holds about 3.5% salt.",
     "rejected": "\n\nHuman: Is the sea salty?\n\nAssistant: No."},
]

COMPARISONS = [  # CarperAI/openai_summarize_comparisons: prompt / chosen / rejected
    {"prompt": "SUBREDDIT: r/dogs\nTITLE: Puppy bites\nPOST: My puppy bites my hands when we play.\nTL;DR:",
     "chosen": "TL;DR: puppy bites during play, how to stop it?", "rejected": "TL;DR: dog"},
]

CHAT = [  # chat messages; the last assistant turn is the completion
    {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "One plus one?"}, {"role": "assistant", "content": "Two."},
                  {"role": "user", "content": "Times three?"}, {"role": "assistant", "content": "Six."}]},
]

TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def cfg(**kw) -> DataConfig:
    c = DataConfig(**kw)
    c.validate()
    return c


@pytest.fixture(scope="module")
def tok_gpt2(tiny_gpt2):
    return load_tokenizer(ModelConfig(name_or_path=tiny_gpt2))


@pytest.fixture(scope="module")
def tok_llama(tiny_llama):
    return load_tokenizer(ModelConfig(name_or_path=tiny_llama))


@pytest.fixture(scope="module")
def tok_t5(tiny_t5):
    return load_tokenizer(ModelConfig(name_or_path=tiny_t5))


# ---------------------------------------------------------------------------------------------
# reading every format
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_read_jsonl_csv_json_parquet_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(DIALOGSUM), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(DIALOGSUM))
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": DIALOGSUM}))
    paths = [write_jsonl(tmp_path / "d.jsonl", DIALOGSUM), write_csv(tmp_path / "d.csv", DIALOGSUM),
             tmp_path / "d.parquet", tmp_path / "d.json", tmp_path / "wrapped.json"]
    for p in paths:
        t = read_table(str(p))
        assert t.rows == DIALOGSUM, p.name  # the csv's quoted multi-line dialogues survive too
        assert t.source == str(p)


@pytest.mark.unit
def test_read_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(TLDR).save_to_disk(str(tmp_path / "ds"))
    assert read_table(str(tmp_path / "ds")).rows == TLDR
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(DIALOGSUM[:2]),
                               "test": datasets.Dataset.from_list(DIALOGSUM[2:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_table(str(tmp_path / "dd"), split="train").rows == DIALOGSUM[:2]
    test = read_table(str(tmp_path / "dd"), split="test")
    assert test.rows == DIALOGSUM[2:] and test.source.endswith("dd[test]")
    with pytest.raises(UserError, match=r"no split 'validation' \(splits: train, test\)"):
        read_table(str(tmp_path / "dd"), split="validation")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a datasets.save_to_disk folder"):
        read_table(str(tmp_path / "plain"))


@pytest.mark.unit
def test_read_missing_and_unsupported_files(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl: file not found"):
        read_table(str(tmp_path / "nope.jsonl"))
    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(UserError, match="unsupported file type '.txt'"):
        read_table(str(tmp_path / "rows.txt"))
    with pytest.raises(UserError, match="data.path is empty"):
        read_table("")


@pytest.mark.unit
def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text(json.dumps(DIALOGSUM[0]) + "\n\n" + '{"id": "train_1", "dialogue": "hi", \n' + json.dumps(DIALOGSUM[2]))
    with pytest.raises(UserError) as e:
        read_table(str(p))
    assert str(e.value).startswith(f"{p}: row 3: column 36: malformed JSON: the line ends before its object does")
    p.write_text(json.dumps(DIALOGSUM[0]) + "\n[1, 2]\n")
    with pytest.raises(UserError, match=r"rows.jsonl: row 2: expected a JSON object, got list"):
        read_table(str(p))


@pytest.mark.unit
def test_malformed_json_and_csv(tmp_path):
    (tmp_path / "a.json").write_text('[{"post": "x"},\n {"post": }]')
    with pytest.raises(UserError, match=r"a.json: line 2: column 11: malformed JSON"):
        read_table(str(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text('[{"post": "x"}, "y"]')
    with pytest.raises(UserError, match=r"b.json: row 2: expected a JSON object, got str"):
        read_table(str(tmp_path / "b.json"))
    (tmp_path / "c.csv").write_text("post,summary\na,b\nc,d,e\n")
    with pytest.raises(UserError, match=r"c.csv: row 3: 3 fields, the header has 2"):
        read_table(str(tmp_path / "c.csv"))
    (tmp_path / "d.parquet").write_text("not parquet")
    with pytest.raises(UserError, match=r"d.parquet: cannot read parquet"):
        read_table(str(tmp_path / "d.parquet"))


# ---------------------------------------------------------------------------------------------
# prompts, column mapping, chat templates
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_prompt_template_renders_dialogsum(tmp_path, tok_gpt2):
    t = read_table(str(write_jsonl(tmp_path / "d.jsonl", DIALOGSUM)))
    stats = DataStats()
    pairs = sft_examples(t, cfg(prompt_template=TEMPLATE, columns={"completion": "summary"}), tok_gpt2, stats)
    assert pairs[0] == (
        "Summarize the following conversation.\n\n#Person1#: Hi, Mr. Smith. I'm Doctor Hawkins. Why are you here "
        "today?\n#Person2#: I found it would be a good idea to get a check-up.\n\nSummary:",
        "Mr. Smith's getting a check-up, and Doctor Hawkins advises him to have one every year.")
    assert [c for _, c in pairs] == [r["summary"] for r in DIALOGSUM]
    assert stats.rows == 3


@pytest.mark.unit
def test_column_mapping(tmp_path, tok_gpt2):
    t = read_table(str(write_jsonl(tmp_path / "tldr.jsonl", TLDR)))
    pairs = sft_examples(t, cfg(columns={"prompt": "post", "completion": "summary"}), tok_gpt2, DataStats())
    assert pairs == [(r["post"], r["summary"]) for r in TLDR]
    pairs = sft_examples(t, cfg(prompt_template="{post}\nTL;DR:", columns={"completion": "summary"}), tok_gpt2,
                         DataStats())
    assert pairs[1] == (TLDR[1]["post"] + "\nTL;DR:", TLDR[1]["summary"])


@pytest.mark.unit
def test_chat_template_used_only_when_the_tokenizer_has_one(tmp_path, tok_gpt2, tok_llama):
    t = read_table(str(write_jsonl(tmp_path / "d.jsonl", DIALOGSUM[:1])))
    raw = TEMPLATE.format(**DIALOGSUM[0])
    c = cfg(prompt_template=TEMPLATE, columns={"completion": "summary"})
    assert sft_examples(t, c, tok_llama, DataStats())[0][0] == f"<|user|>{raw}</s><|assistant|>"
    assert sft_examples(t, c, tok_gpt2, DataStats())[0][0] == raw  # auto, tokenizer without a template
    sys_c = cfg(prompt_template=TEMPLATE, columns={"completion": "summary"}, system_prompt="Be brief.")
    assert sft_examples(t, sys_c, tok_llama, DataStats())[0][0] == f"<|system|>Be brief.</s><|user|>{raw}</s><|assistant|>"
    off = cfg(prompt_template=TEMPLATE, columns={"completion": "summary"}, chat_template="false")
    assert sft_examples(t, off, tok_llama, DataStats())[0][0] == raw
    on = cfg(prompt_template=TEMPLATE, columns={"completion": "summary"}, chat_template="true")
    assert sft_examples(t, on, tok_llama, DataStats())[0][0] == f"<|user|>{raw}</s><|assistant|>"
    with pytest.raises(UserError, match="data.chat_template=true but the tokenizer has no chat template"):
        sft_examples(t, on, tok_gpt2, DataStats())


@pytest.mark.unit
def test_chat_messages_rows(tmp_path, tok_gpt2, tok_llama):
    from rlhfkit.recipes.sft import Config

    t = read_table(str(write_jsonl(tmp_path / "chat.jsonl", CHAT)))
    assert sft_examples(t, cfg(), tok_llama, DataStats()) == [
        ("<|user|>Say hello.</s><|assistant|>", "Hello!"),
        ("<|user|>One plus one?</s><|assistant|>Two.</s><|user|>Times three?</s><|assistant|>", "Six."),
    ]
    assert sft_examples(t, cfg(), tok_gpt2, DataStats())[1] == (
        "user: One plus one?\nassistant: Two.\nuser: Times three?\nassistant:", "Six.")
    # the SFT recipe's default data section (identity prompt/completion mapping) still reads messages
    assert sft_examples(t, Config().data, tok_llama, DataStats())[0] == ("<|user|>Say hello.</s><|assistant|>", "Hello!")
    bad = write_jsonl(tmp_path / "bad.jsonl", [CHAT[0], {"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(UserError, match=r"bad.jsonl: row 2: column 'messages': the last message must be the assistant's"):
        sft_examples(read_table(str(bad)), cfg(), tok_llama, DataStats())


@pytest.mark.unit
def test_prompt_examples_keep_the_row_for_rewards(tmp_path, tok_gpt2):
    t = read_table(str(write_jsonl(tmp_path / "d.jsonl", DIALOGSUM)))
    out = prompt_examples(t, cfg(prompt_template=TEMPLATE), tok_gpt2, DataStats())
    assert [p for p, _ in out] == [TEMPLATE.format(**r) for r in DIALOGSUM]
    assert out[2][1]["topic"] == "find keys" and out[2][1]["summary"] == DIALOGSUM[2]["summary"]


# ---------------------------------------------------------------------------------------------
# schema errors name file, row and column
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_missing_column_names_row_and_column(tmp_path, tok_gpt2):
    rows = [DIALOGSUM[0], {k: v for k, v in DIALOGSUM[1].items() if k != "summary"}]
    p = tmp_path / "d.jsonl"
    # a blank line between rows: the row number stays the line number
    p.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    c = cfg(prompt_template=TEMPLATE, columns={"completion": "summary"})
    with pytest.raises(UserError) as e:
        sft_examples(read_table(str(p)), c, tok_gpt2, DataStats())
    assert str(e.value).startswith(f"{p}: row 3: missing column 'summary' (columns: id, dialogue, topic)")
    # a column the template needs
    p2 = write_jsonl(tmp_path / "e.jsonl", [{"id": "x", "summary": "s"}])
    with pytest.raises(UserError, match=r"e.jsonl: row 1: prompt_template needs column 'dialogue'"):
        sft_examples(read_table(str(p2)), c, tok_gpt2, DataStats())


@pytest.mark.unit
def test_wrong_type_and_empty_field_are_named(tmp_path, tok_gpt2):
    c = cfg(columns={"prompt": "post", "completion": "summary"})
    p = write_jsonl(tmp_path / "t.jsonl", [TLDR[0], {"post": "p", "summary": 42}])
    with pytest.raises(UserError, match=r"t.jsonl: row 2: column 'summary' must be text, got int"):
        sft_examples(read_table(str(p)), c, tok_gpt2, DataStats())
    p = write_jsonl(tmp_path / "t.jsonl", [{"post": "  \n", "summary": "s"}])
    with pytest.raises(UserError, match=r"t.jsonl: row 1: column 'post' is empty"):
        sft_examples(read_table(str(p)), c, tok_gpt2, DataStats())
    # csv: the row is the file line where the record starts (header is line 1; TLDR[0] spans lines 2-4)
    p = write_csv(tmp_path / "t.csv", [TLDR[0], {"post": "p\nq", "summary": ""}, TLDR[1]])
    with pytest.raises(UserError, match=r"t.csv: row 5: column 'summary' is empty"):
        sft_examples(read_table(str(p)), c, tok_gpt2, DataStats())
    # a json list: the row is the 1-based position in the list
    (tmp_path / "t.json").write_text(json.dumps([TLDR[0], {"post": None, "summary": "s"}]))
    with pytest.raises(UserError, match=r"t.json: row 2: column 'post' must be text, got NoneType"):
        sft_examples(read_table(str(tmp_path / "t.json")), c, tok_gpt2, DataStats())


@pytest.mark.unit
def test_drop_invalid_counts_drops(tmp_path, tok_gpt2):
    rows = [TLDR[0], {"post": "p", "summary": ""}, {"post": "p"}, TLDR[1]]
    t = read_table(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    stats = DataStats()
    pairs = sft_examples(t, cfg(columns={"prompt": "post", "completion": "summary"}, drop_invalid=True), tok_gpt2, stats)
    assert pairs == [(r["post"], r["summary"]) for r in TLDR]
    assert stats.as_dict() == {"rows": 2, "dropped_invalid": 2, "dropped_identical": 0, "truncated": 0,
                               "dropped_overlong": 0}


# ---------------------------------------------------------------------------------------------
# preference layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_split_shared_prefix_hh_rlhf():
    prompt, chosen, rejected = split_shared_prefix(HH[0]["chosen"], HH[0]["rejected"])
    assert prompt == ("\n\nHuman: What are some good names for a cat?\n\nAssistant: Whiskers, Luna and Milo are "
                      "popular.\n\nHuman: Which one do you like best?\n\nAssistant:")
    assert chosen == " I like Luna, it suits a calm cat."  # the shared " I like " goes back into the completion
    assert rejected == " I like none of them."
    assert split_shared_prefix(HH[1]["chosen"], HH[1]["rejected"]) == (
        "\n\nHuman: Is the sea salty?\n\nAssistant:", " Yes, sea water holds about 3.5% salt.", " No.")
    # without an Assistant: marker the cut goes back to the last whitespace
    assert split_shared_prefix("the cat sat down", "the cat sang") == ("the cat ", "sat down", "sang")
    assert split_shared_prefix("abc", "abd") == ("", "abc", "abd")


@pytest.mark.unit
def test_preference_layouts(tmp_path, tok_gpt2, tok_llama):
    hh = preference_examples(read_table(str(write_jsonl(tmp_path / "hh.jsonl", HH))), cfg(), tok_gpt2, DataStats())
    assert hh == [split_shared_prefix(r["chosen"], r["rejected"]) for r in HH]
    comp = preference_examples(read_table(str(write_jsonl(tmp_path / "c.jsonl", COMPARISONS))), cfg(), tok_gpt2,
                               DataStats())
    assert comp == [(COMPARISONS[0]["prompt"], COMPARISONS[0]["chosen"], COMPARISONS[0]["rejected"])]
    chat = [{"chosen": CHAT[1]["messages"],
             "rejected": CHAT[1]["messages"][:-1] + [{"role": "assistant", "content": "Five."}]}]
    out = preference_examples(read_table(str(write_jsonl(tmp_path / "m.jsonl", chat))), cfg(), tok_llama, DataStats())
    assert out == [("<|user|>One plus one?</s><|assistant|>Two.</s><|user|>Times three?</s><|assistant|>",
                    "Six.", "Five.")]
    diverged = [{"chosen": CHAT[1]["messages"], "rejected": CHAT[0]["messages"]}]
    with pytest.raises(UserError, match=r"m2.jsonl: row 1: chosen and rejected conversations differ before the last"):
        preference_examples(read_table(str(write_jsonl(tmp_path / "m2.jsonl", diverged))), cfg(), tok_llama,
                            DataStats())


@pytest.mark.unit
def test_chosen_equals_rejected_error_or_counted_drop(tmp_path, tok_gpt2):
    same = {"prompt": "TL;DR:", "chosen": "same text", "rejected": "same text"}
    hh_same = {"chosen": HH[1]["chosen"], "rejected": HH[1]["chosen"]}
    missing = {"prompt": "p", "chosen": "a"}
    p = write_jsonl(tmp_path / "p.jsonl", [COMPARISONS[0], same, hh_same, missing, HH[0]])
    t = read_table(str(p))
    with pytest.raises(UserError, match=r"p.jsonl: row 2: column 'chosen' equals column 'rejected' \(no preference\)"):
        preference_examples(t, cfg(), tok_gpt2, DataStats())
    stats = DataStats()
    out = preference_examples(t, cfg(drop_invalid=True), tok_gpt2, stats)
    assert [o[1] for o in out] == [COMPARISONS[0]["chosen"], " I like Luna, it suits a calm cat."]
    assert (stats.rows, stats.dropped_identical, stats.dropped_invalid) == (2, 2, 1)


# ---------------------------------------------------------------------------------------------
# tokenization and the over-long policy
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_overlong_truncate_from_the_left_or_drop(tok_gpt2):
    long_p, long_c = "the cat sees a dog and the dog sees a bird", "red blue green happy sad big"
    short = ("one", "two")
    p_ids = tok_gpt2(long_p, add_special_tokens=False)["input_ids"]
    c_ids = tok_gpt2(long_c, add_special_tokens=False)["input_ids"] + [tok_gpt2.eos_token_id]
    assert len(p_ids) > 6 and len(c_ids) > 4
    s_p, s_c = encode_prompt(tok_gpt2, short[0], False), encode_completion(tok_gpt2, short[1], False)
    assert len(s_p) <= 6 and len(s_c) <= 4
    stats = DataStats()
    out = tokenize_pairs([(long_p, long_c), short], tok_gpt2, cfg(max_prompt_length=6, max_completion_length=4),
                         max_length=512, is_seq2seq=False, stats=stats)
    assert out[0].prompt_ids == p_ids[-6:]  # the end of the prompt (next to the completion) is kept
    assert out[0].completion_ids == c_ids[:4]
    assert (out[1].prompt_ids, out[1].completion_ids) == (s_p, s_c)
    assert (stats.truncated, stats.dropped_overlong) == (1, 0)
    stats = DataStats()
    out = tokenize_pairs([(long_p, long_c), short], tok_gpt2,
                         cfg(max_prompt_length=6, max_completion_length=4, overlong="drop"), 512, False, stats)
    assert [(e.prompt_ids, e.completion_ids) for e in out] == [(s_p, s_c)]
    assert (stats.truncated, stats.dropped_overlong) == (0, 1)
    # causal: prompt + completion must also fit model.max_length; the completion keeps
    # min(its capped length 4, max_length // 2 = 4) tokens and the prompt gets the other 4
    stats = DataStats()
    out = tokenize_pairs([(long_p, long_c)], tok_gpt2, cfg(max_prompt_length=6, max_completion_length=4), 8, False,
                         stats)
    assert out[0].prompt_ids == p_ids[-4:] and out[0].completion_ids == c_ids[:4] and len(out[0]) == 8


@pytest.mark.unit
def test_completion_ends_with_one_eos(tok_gpt2, tok_t5):
    ids = encode_completion(tok_gpt2, "red fish", False)
    assert ids == tok_gpt2("red fish", add_special_tokens=False)["input_ids"] + [tok_gpt2.eos_token_id]
    ids5 = encode_completion(tok_t5, "red fish", True)
    assert ids5[-1] == tok_t5.eos_token_id and ids5[:-1] == tok_t5("red fish", add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok_t5, "red fish", True) == ids5  # T5 prompts end with </s> too


# ---------------------------------------------------------------------------------------------
# collation and packing
# ---------------------------------------------------------------------------------------------

EXAMPLES = [Example([5, 6, 7], [8, 9, 1]), Example([3], [4, 1])]


@pytest.mark.unit
def test_collate_causal_exact():
    b = collate(EXAMPLES, pad_id=0, is_seq2seq=False)
    assert torch.equal(b["input_ids"], torch.tensor([[5, 6, 7, 8, 9, 1], [0, 0, 3, 4, 1, 0]]))
    assert torch.equal(b["attention_mask"], torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]]))
    assert torch.equal(b["labels"], torch.tensor([[-100, -100, -100, 8, 9, 1], [-100, -100, -100, 4, 1, -100]]))
    assert set(b) == {"input_ids", "attention_mask", "labels"}


@pytest.mark.unit
def test_collate_seq2seq_exact():
    b = collate(EXAMPLES, pad_id=0, is_seq2seq=True)
    assert torch.equal(b["input_ids"], torch.tensor([[5, 6, 7], [3, 0, 0]]))
    assert torch.equal(b["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(b["labels"], torch.tensor([[8, 9, 1], [4, 1, -100]]))
    assert torch.equal(b["decoder_attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))


@pytest.mark.unit
def test_pack_first_fit_exact():
    exs = [Example([3], [4, 1]), Example([5, 6, 7], [8, 9, 1]), Example([2], [1])]  # lengths 3, 6, 2
    rows = pack(exs, block=8, pad_id=0)
    # longest first: [6] then 3 does not fit the 2 left -> new row; 2 fits the first row
    assert rows == [
        {"input_ids": [5, 6, 7, 8, 9, 1, 2, 1], "labels": [-100, -100, -100, 8, 9, 1, -100, 1],
         "position_ids": [0, 1, 2, 3, 4, 5, 0, 1]},
        {"input_ids": [3, 4, 1], "labels": [-100, 4, 1], "position_ids": [0, 1, 2]},
    ]
    b = collate_packed(rows, pad_id=0)
    assert torch.equal(b["input_ids"], torch.tensor([[5, 6, 7, 8, 9, 1, 2, 1], [3, 4, 1, 0, 0, 0, 0, 0]]))
    assert torch.equal(b["labels"], torch.tensor([[-100, -100, -100, 8, 9, 1, -100, 1],
                                                  [-100, 4, 1, -100, -100, -100, -100, -100]]))
    assert torch.equal(b["position_ids"], torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4]]))
    assert int(b["n_real_tokens"]) == 11


def _segments(row_ids: list[int], row_pos: list[int]) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(row_pos) if p == 0] + [len(row_pos)]
    return list(zip(starts[:-1], starts[1:]))


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_gpt2"])
def test_packed_logprobs_equal_unpacked(kind, request):
    path = request.getfixturevalue(kind)
    mc = ModelConfig(name_or_path=path)
    tok = load_tokenizer(mc)
    policy = PolicyModel(load_model(mc, torch.device("cpu"))).eval()
    texts = [("the cat sees a dog", " red fish runs"), ("hello", " one two three four five six"),
             ("big small fast slow good bad new old hot cold", " sun"), ("why", " because"),
             ("where is the shop", " near the river and the hill")]
    exs = tokenize_pairs(texts, tok, cfg(), 256, False, DataStats())
    block = 40
    rows = pack(exs, block, tok.pad_token_id)
    assert 1 < len(rows) < len(exs)  # several examples share a row, and rows need padding
    packed = collate_packed(rows, tok.pad_token_id)
    unpacked = collate(exs, tok.pad_token_id, False)
    with torch.no_grad():
        lp_packed = policy(**packed)["logps"]  # (R, block)
        out = policy(**unpacked)
    P = max(len(e.prompt_ids) for e in exs)
    expected = {tuple(e.prompt_ids + e.completion_ids): out["logps"][i, P: P + len(e.completion_ids)]
                for i, e in enumerate(exs)}
    seen = 0
    for r, row in enumerate(rows):
        for s, e in _segments(row["input_ids"], row["position_ids"]):
            key = tuple(row["input_ids"][s:e])
            n_c = sum(1 for x in row["labels"][s:e] if x != -100)
            got = lp_packed[r, e - n_c: e]
            torch.testing.assert_close(got, expected[key], atol=1e-5, rtol=0)
            seen += 1
    assert seen == len(exs)
    # the same total NLL, so SFT on packed rows optimises the same objective
    total_packed = float((lp_packed * (packed["labels"] != -100)).sum())
    assert abs(total_packed - float((out["logps"] * out["mask"]).sum())) < 1e-4


# ---------------------------------------------------------------------------------------------
# batch order
# ---------------------------------------------------------------------------------------------


def _epoch_rows(b: StepBatcher, epoch: int = 0) -> list[int]:
    out = []
    for s in range(epoch * b.steps_per_epoch, (epoch + 1) * b.steps_per_epoch):
        for mb in b.step(s):
            out += mb
    return out


@pytest.mark.unit
def test_step_batcher_deterministic_and_every_row_once_per_epoch():
    lengths = [(i * 37) % 50 + 1 for i in range(48)]
    for group in (True, False):
        a = StepBatcher(lengths, batch_size=4, grad_accum=2, seed=7, group_by_length=group)
        b = StepBatcher(lengths, batch_size=4, grad_accum=2, seed=7, group_by_length=group)
        assert a.steps_per_epoch == 6
        assert [a.step(s) for s in range(12)] == [b.step(s) for s in range(12)]
        assert all(len(mb) == 4 for s in range(6) for mb in a.step(s))
        e0, e1 = _epoch_rows(a, 0), _epoch_rows(a, 1)
        assert sorted(e0) == list(range(48)) and sorted(e1) == list(range(48))
        assert e0 != e1  # a fresh permutation each epoch
        # a pure function of (seed, step): asking out of order gives the same batches
        assert b.step(11) == a.step(11) and b.step(0) == a.step(0)
        c = StepBatcher(lengths, batch_size=4, grad_accum=2, seed=8, group_by_length=group)
        assert _epoch_rows(c) != e0


@pytest.mark.unit
def test_step_batcher_drops_only_the_incomplete_batch():
    b = StepBatcher(list(range(1, 23)), batch_size=4, grad_accum=1, seed=0)  # 22 rows -> 5 full batches
    rows = _epoch_rows(b)
    assert len(rows) == 20 and len(set(rows)) == 20
    with pytest.raises(UserError, match="3 training rows are fewer than one batch"):
        StepBatcher([1, 2, 3], batch_size=2, grad_accum=1, seed=0, world_size=2)


@pytest.mark.unit
def test_group_by_length_makes_batches_more_uniform():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 200) for _ in range(400)]

    def spread(group: bool) -> float:
        b = StepBatcher(lengths, batch_size=8, grad_accum=1, seed=3, group_by_length=group)
        return statistics.mean(max(lengths[i] for i in mb) - min(lengths[i] for i in mb)
                               for s in range(b.steps_per_epoch) for mb in b.step(s))

    grouped, shuffled = spread(True), spread(False)
    assert grouped < 0.25 * shuffled, (grouped, shuffled)


@pytest.mark.unit
@pytest.mark.parametrize("group", [True, False])
def test_two_ranks_concatenate_to_one_process_batch(group):
    lengths = [(i * 13) % 29 + 1 for i in range(64)]
    one = StepBatcher(lengths, batch_size=8, grad_accum=2, seed=5, group_by_length=group)
    r0 = StepBatcher(lengths, batch_size=4, grad_accum=2, seed=5, group_by_length=group, world_size=2, rank=0)
    r1 = StepBatcher(lengths, batch_size=4, grad_accum=2, seed=5, group_by_length=group, world_size=2, rank=1)
    assert one.steps_per_epoch == r0.steps_per_epoch == 4
    for s in range(8):
        for mb, a, b in zip(one.step(s), r0.step(s), r1.step(s)):
            assert len(a) == len(b) == 4 and a + b == mb
            assert not set(a) & set(b)


# ---------------------------------------------------------------------------------------------
# held-out split
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_load_splits_heldout_fraction_disjoint_and_deterministic(tmp_path):
    rows = [{"post": f"post {i}", "summary": f"summary {i}"} for i in range(50)]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    c = cfg(path=str(p), eval_fraction=0.2, shuffle_seed=1)
    train, held = load_splits(c)
    assert len(train.rows) == 40 and len(held.rows) == 10
    train_posts = {r["post"] for r in train.rows}
    held_posts = {r["post"] for r in held.rows}
    assert not train_posts & held_posts and train_posts | held_posts == {r["post"] for r in rows}
    # rows keep their file line numbers for error messages
    assert all(held.where(i) == f"{p}: row {int(r['post'].split()[1]) + 1}" for i, r in enumerate(held.rows))
    train2, held2 = load_splits(c)
    assert train2.rows == train.rows and held2.rows == held.rows
    _, held3 = load_splits(cfg(path=str(p), eval_fraction=0.2, shuffle_seed=2))
    assert held3.rows != held.rows
    # max_rows limits the training rows only
    train4, held4 = load_splits(cfg(path=str(p), eval_fraction=0.2, shuffle_seed=1, max_rows=5))
    assert train4.rows == train.rows[:5] and held4.rows == held.rows
    # no held-out rows when the fraction is 0
    assert load_splits(cfg(path=str(p), eval_fraction=0.0))[1] is None


@pytest.mark.unit
def test_load_splits_eval_path_and_eval_split(tmp_path):
    import datasets

    a = write_jsonl(tmp_path / "a.jsonl", DIALOGSUM[:2])
    b = write_jsonl(tmp_path / "b.jsonl", DIALOGSUM[2:])
    train, held = load_splits(cfg(path=str(a), eval_path=str(b)))
    assert train.rows == DIALOGSUM[:2] and held.rows == DIALOGSUM[2:]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(DIALOGSUM[:2]),
                          "validation": datasets.Dataset.from_list(DIALOGSUM[2:])}).save_to_disk(str(tmp_path / "dd"))
    train, held = load_splits(cfg(path=str(tmp_path / "dd"), eval_split="validation"))
    assert train.rows == DIALOGSUM[:2] and held.rows == DIALOGSUM[2:]


@pytest.mark.unit
def test_table_where_without_row_numbers():
    t = Table([{"a": 1}, {"a": 2}], "x.json")
    assert t.where(1) == "x.json: row 2"
