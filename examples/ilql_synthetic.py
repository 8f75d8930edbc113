"""Synthetic offline-RL data for ``rlhfkit ilql`` (examples/ilql_tiny.yaml), its reward, and the
tiny GPT-2 the example and ``benchmarks/ilql.py`` train.

Behaviour data: a prompt of two words and a colon, an output of five words drawn from ``POOL``;
with probability 0.3 one of the five is replaced by "cat". The reward is 1 when the output contains
the word "cat", else 0, so the behaviour policy's mean reward is about 0.3 and the best policy
(always say "cat") earns 1.

    python examples/ilql_synthetic.py                        # writes examples/data/ilql_synthetic.jsonl
    python examples/ilql_synthetic.py --model runs/models/tiny-gpt2-4k   # and builds the model

The model is a randomly initialised GPT-2 (n_embd 256, 4 layers, 4 heads, about 4M parameters)
with a 4,096-token byte-level BPE trained here on random text from the bundled English word list.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

POOL = "dog bird fish tree house road sun moon star rain snow wind sea river hill red blue green".split()
TARGET = "cat"
HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "ilql_synthetic.jsonl"


def make_rows(n: int = 2000, seed: int = 0, p_target: float = 0.3) -> list[dict]:
    """``n`` rows of {prompt, output, reward}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(POOL) for _ in range(5)]
        if rng.random() < p_target:
            words[rng.randrange(5)] = TARGET
        output = " ".join(words)
        rows.append({"prompt": f"{rng.choice(POOL)} {rng.choice(POOL)}:", "output": output,
                     "reward": contains_target(output)})
    return rows


def contains_target(text: str) -> float:
    return 1.0 if TARGET in text.replace(".", " ").split() else 0.0


def reward(prompts, completions, **columns) -> list[float]:
    """The rlhfkit reward signature: 1.0 for each completion that contains the word "cat"."""
    return [contains_target(c) for c in completions]


def build_tiny_gpt2(folder: str | Path, n_embd: int = 256, n_layer: int = 4, n_head: int = 4,
                    vocab_size: int = 4096, seed: int = 0) -> str:
    """Save a random GPT-2 and a ``vocab_size`` byte-level BPE tokenizer into ``folder`` (once)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words_file = Path(__file__).resolve().parents[1] / "rlhfkit" / "resources" / "words.txt"
    words = words_file.read_text(encoding="ascii").split()
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(20000)]
    corpus += [" ".join(rng.choice(POOL + [TARGET]) for _ in range(8)) for _ in range(2000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>", model_max_length=128)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(fast), n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=128,
                     bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DATA), help="jsonl file to write")
    ap.add_argument("--model", default=None, help="also build the tiny GPT-2 into this folder")
    args = ap.parse_args()
    rows = make_rows(args.rows, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    mean = sum(r["reward"] for r in rows) / len(rows)
    print(f"wrote {len(rows)} rows to {args.out} (mean reward {mean:.3f})")
    if args.model:
        print(f"model: {build_tiny_gpt2(args.model)}")


if __name__ == "__main__":
    main()
