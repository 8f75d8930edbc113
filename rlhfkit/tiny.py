"""Tiny models for tests and `rlhfkit demo --quick`: a BPE tokenizer trained locally and GPT-2 /
Llama / T5 / BERT built from configs.

They are saved with ``save_pretrained`` and loaded back by path, the same code path as a hub
name. Nothing touches the network.
"""
from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the a an cat dog bird fish tree house car road sun moon star rain snow wind sea river hill "
    "red blue green happy sad big small fast slow good bad new old hot cold yes no one two three "
    "four five six seven eight nine ten runs eats sees likes walks talks sleeps jumps reads writes "
    "summary dialogue person said asked told because and or but so then when where what who why "
    "hello thanks please sorry friend doctor teacher shop food water coffee book movie game music"
).split()

SPECIAL = ["<pad>", "</s>", "<s>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(n)]


def build_tokenizer(seq2seq: bool = False, chat: bool = False, vocab_size: int = 320, texts: list[str] | None = None):
    """A byte-level BPE of at most ``vocab_size`` tokens trained on ``texts`` (default: :func:`corpus`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts if texts is not None else corpus(), trainer)
    if seq2seq:  # T5 style: every encoded text ends with </s>
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token=None if seq2seq else "<s>", model_max_length=256)
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(kind: str, vocab_size: int, seed: int = 0, **overrides):
    """Random tiny models; initializer_range 0.2 (not 0.02) so that LoRA on a frozen random
    network can still move its outputs, as it can on a pretrained one. ``overrides`` replace
    config fields (e.g. ``hidden_size=256, num_hidden_layers=4`` for the benchmark's Llama)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    if kind == "gpt2":
        kw = dict(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=256, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2, bos_token_id=2, eos_token_id=1, pad_token_id=0)
        return GPT2LMHeadModel(GPT2Config(**{**kw, **overrides}))
    if kind == "llama":
        kw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                  bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
        return LlamaForCausalLM(LlamaConfig(**{**kw, **overrides}))
    if kind == "t5":
        kw = dict(vocab_size=vocab_size, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                  dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return T5ForConditionalGeneration(T5Config(**{**kw, **overrides}))
    raise ValueError(kind)


def save_tiny_bert(folder: Path, seed: int = 0) -> str:
    """A tiny BERT with a fresh one-logit head and a word-level WordPiece vocab (reward models)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "!", ":", "'"] + sorted(set(WORDS)) + \
        [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["##" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab=str(folder / "vocab.txt"), model_max_length=256)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256, num_labels=1, initializer_range=0.2)
    BertForSequenceClassification(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return str(folder)


def save_tiny(kind: str, folder: Path, seed: int = 0) -> str:
    """Build and save a tiny model + tokenizer; returns the folder (a 'model name')."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return str(folder)
    if kind == "bert":
        return save_tiny_bert(folder, seed)
    tok = build_tokenizer(seq2seq=kind == "t5", chat=kind == "llama")
    model = build_model(kind, len(tok), seed)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return str(folder)
