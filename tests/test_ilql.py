"""ILQL: advantage-shifted decoding raises a one-token reward above the behaviour data's mean;
mechanics (shapes, decoding shift, target sync, resume) on causal and seq2seq tiny models."""
import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from pytest import approx

from helpers import write_jsonl
from rlhfkit.config import DataConfig, GenerationConfig, ModelConfig, UserError, from_dict, validate
from rlhfkit.data import DataStats
from rlhfkit.models import load_policy
from rlhfkit.recipes import ilql

# Behaviour data: five words from POOL (no word starts with "c"), and with probability 0.3 one of
# them replaced by "cat". The reward is 1 when the output contains the word "cat", else 0.
POOL = "dog bird fish tree house road sun moon star rain snow wind sea river hill red blue green".split()


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models (hidden size 32) gain nothing from a second thread, and on a busy shared
    machine two spinning threads were 20x slower than one: keep these tests' time stable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cat_samples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(POOL) for _ in range(5)]
        if rng.random() < 0.3:
            words[rng.randrange(5)] = "cat"
        out.append((f"{rng.choice(POOL)} {rng.choice(POOL)}:", " ".join(words)))
    return out


def has_cat(prompts, completions, **_):
    return [1.0 if "cat" in c.split() else 0.0 for c in completions]


def quick_config(out, **over) -> dict:
    cfg = dict(train=dict(output_dir=str(out), max_steps=3, batch_size=8, lr=3e-3, progress=False, seed=0,
                          group_by_length=False),
               data=dict(chat_template="false"), generation=dict(max_new_tokens=12, top_k=0, batch_size=64))
    return merge(cfg, over)


def merge(base: dict, over: dict) -> dict:
    return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in over.items()}}


# ---------------------------------------------------------------------------------------------
# learning
# ---------------------------------------------------------------------------------------------


@pytest.mark.learning
def test_ilql_advantage_shift_raises_reward(tiny_gpt2, tmp_path):
    data = cat_samples(600)
    rewards = has_cat(None, [o for _, o in data])
    behaviour = sum(rewards) / len(rewards)
    assert 0.25 < behaviour < 0.35  # 0.3 by construction
    model = ilql.train_offline(tiny_gpt2, data, rewards, **quick_config(
        tmp_path / "run", train=dict(max_steps=300, batch_size=32, save_model=False),
        generation=dict(max_new_tokens=24)))
    prompts = [p for p, _ in cat_samples(150, seed=1)]
    got = {beta: sum(has_cat(prompts, model.generate(prompts, beta=beta, seed=0))) / len(prompts) for beta in (0, 4)}
    print(f"behaviour mean {behaviour:.3f}; decoded reward {got}")
    # The plain policy (beta 0) imitates the behaviour data (150 samples: std of the mean ~0.04);
    # the advantage shift (beta 4) must beat the behaviour mean by at least 0.3 absolute, and the
    # plain policy by as much. Measured: behaviour 0.278, beta 0: 0.23, beta 4: 0.91 (other data
    # seeds: beta 0 0.27-0.37, beta 4 0.95-0.98).
    assert got[0] <= behaviour + 0.15
    assert got[4] >= behaviour + 0.3
    assert got[4] >= got[0] + 0.3


@pytest.mark.learning
def test_filtered_bc_learns_from_the_best_rows(tiny_gpt2, tmp_path):
    data = cat_samples(400)
    rewards = has_cat(None, [o for _, o in data])
    behaviour = sum(rewards) / len(rewards)
    model = ilql.train_offline(tiny_gpt2, data, rewards, **quick_config(
        tmp_path / "run", method="filtered_bc", top_fraction=0.2, train=dict(max_steps=300, batch_size=16)))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["kept_rows"] == 80 and summary["kept_reward_min"] == 1.0  # 20% of 400, all with a cat
    assert (tmp_path / "run" / "model.safetensors").is_file() and not (tmp_path / "run" / ilql.HEADS_FILE).exists()
    from rlhfkit.policy import PolicyModel

    prompts = [p for p, _ in cat_samples(100, seed=1)]
    gen = GenerationConfig(max_new_tokens=24, top_k=0)
    outs = ilql.decode(PolicyModel(model), tokenizer_of(tiny_gpt2), prompts, gen, seed=0)
    got = sum(has_cat(prompts, outs)) / len(prompts)
    print(f"behaviour mean {behaviour:.3f}; filtered BC {got:.3f}")
    assert got >= behaviour + 0.3  # measured: 0.285 -> 0.72


def tokenizer_of(path):
    return load_policy(ModelConfig(name_or_path=path))[1]


# ---------------------------------------------------------------------------------------------
# mechanics
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_seq2seq_ilql_shapes_and_loss_falls(tiny_t5, tmp_path):
    data = cat_samples(64)
    rewards = has_cat(None, [o for _, o in data])
    model, tok = load_policy(ModelConfig(name_or_path=tiny_t5))
    m = ilql.ILQLModel(model, tokenizer=tok)
    stats = DataStats()
    ex = ilql.tokenize_samples([ilql.Sample(p, o, r) for (p, o), r in zip(data, rewards)], tok, DataConfig(), 64, True,
                               stats)
    batch = ilql.collate_scored(ex[:8], tok.pad_token_id, True)
    B, T = batch["labels"].shape
    V = model.config.vocab_size
    out = m(**batch)
    assert out["logits"].shape == (B, T, V) and len(out["q"]) == 2 and out["q"][1].shape == (B, T, V)
    assert len(out["target_q"]) == 2 and out["target_q"][0].shape == (B, T) and out["values"].shape == (B, T)
    assert torch.equal(out["mask"], batch["labels"] != -100)
    # the target heads start as copies: their Q at the actions equals the online heads' gather
    mask = out["mask"]
    q_taken = out["q"][0].gather(-1, out["actions"][..., None]).squeeze(-1)  # (B, T)
    assert torch.allclose(out["target_q"][0][mask], q_taken[mask], atol=1e-5)
    assert out["q"][0][~mask].abs().max() == 0  # padding gets no head product
    assert out["target_q"][0].grad_fn is None
    # the LM logits are the model's own
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"], decoder_attention_mask=batch["decoder_attention_mask"]).logits
    assert torch.allclose(out["logits"], ref, atol=1e-5)

    cfg = config(quick_config(tmp_path / "run"))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        loss, metrics = ilql.ilql_batch_loss(m, batch, cfg)
        loss.backward()
        opt.step()
        opt.zero_grad()
        m.heads.sync_target(0.5)
        first = first if first is not None else loss.item()
    assert metrics["loss"] < 0.8 * first, (first, metrics)
    outs = m.generate([p for p, _ in data[:4]], beta=2.0, seed=0, max_new_tokens=6)
    assert len(outs) == 4 and all(isinstance(o, str) for o in outs)


@pytest.mark.unit
@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_causal_forward_matches_a_plain_forward_per_row(fixture, request):
    # Rows of different prompt and output lengths (left- and right-padding): the LM logits and
    # the heads at each action equal those of an unpadded forward of that row alone.
    model, tok = load_policy(ModelConfig(name_or_path=request.getfixturevalue(fixture)))
    m = ilql.ILQLModel(model, tokenizer=tok)
    samples = [ilql.Sample("dog:", "sun moon star", 1.0), ilql.Sample("red blue green sea:", "cat", 0.0)]
    ex = ilql.tokenize_samples(samples, tok, DataConfig(chat_template="false"), 64, False, DataStats())
    batch = ilql.collate_scored(ex, tok.pad_token_id, False)
    out = m(**batch)
    assert out["mask"].sum(1).tolist() == [len(e.completion_ids) for e in ex]
    for b, e in enumerate(ex):
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        with torch.no_grad(), ilql.lm_head_input(model) as cap:
            logits = model(input_ids=ids).logits[0, len(e.prompt_ids) - 1: -1]  # (C, V)
        n = len(e.completion_ids)
        assert torch.allclose(out["logits"][b, :n], logits, atol=1e-4)
        assert torch.equal(out["actions"][b, :n], torch.tensor(e.completion_ids))
        h = cap["h"][0, len(e.prompt_ids) - 1: -1]
        assert torch.allclose(out["values"][b, :n], m.heads.value(h), atol=1e-4)
        assert torch.allclose(out["q"][1][b, :n], m.heads.q(h)[1], atol=1e-4)


@pytest.mark.unit
@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_t5"])
def test_greedy_decoding_follows_the_shifted_logits(fixture, request):
    # Greedy decoding through generate() (hook + logits processor, KV cache) must pick, at each
    # step, argmax of log_softmax(logits) + beta (min target Q - V) computed by a full forward.
    path = request.getfixturevalue(fixture)
    model, tok = load_policy(ModelConfig(name_or_path=path))
    torch.manual_seed(0)
    m = ilql.ILQLModel(model, tokenizer=tok, kind="mlp").eval()
    with torch.no_grad():  # make the target heads differ from the Q heads and the shift large
        for p in m.heads.target_q.parameters():
            p.normal_(0, 1.0)
    seq2seq = m.is_seq2seq
    greedy = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5)
    beta = 3.0
    prompts = ["dog bird:", "sun moon star:"]
    texts = m.generate(prompts, beta=beta, **greedy)
    plain = m.generate(prompts, beta=0.0, **greedy)
    assert texts != plain  # the shift changes the decoding
    hf = model
    for prompt, text in zip(prompts, texts):
        ids = ilql.prompt_ids(tok, prompt, seq2seq)
        seq = [] if not seq2seq else [hf.config.decoder_start_token_id]
        cur = list(ids)
        for _ in range(5):
            with torch.no_grad(), ilql.lm_head_input(hf) as cap:
                if seq2seq:
                    logits = hf(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([seq])).logits[0, -1]
                else:
                    logits = hf(input_ids=torch.tensor([cur])).logits[0, -1]
                h = cap["h"][0, -1]
                score = F.log_softmax(logits, -1) + beta * m.heads.advantage(h)
            score[tok.eos_token_id] = -float("inf")  # min_new_tokens
            nxt = int(score.argmax())
            seq.append(nxt)
            cur.append(nxt)
        expect = tok.decode(seq[1:] if seq2seq else seq, skip_special_tokens=True).strip()
        assert text == expect


@pytest.mark.unit
def test_lora_trains_adapters_and_heads_and_reloads(tiny_gpt2, tmp_path):
    data = cat_samples(32)
    rewards = has_cat(None, [o for _, o in data])
    m = ilql.train_offline(tiny_gpt2, data, rewards, **quick_config(
        tmp_path / "run", lora=dict(enabled=True, target_modules=["all-linear"]), beta=2.0))
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"lm", "heads"}
    assert all("lora_" in n for n, p in m.lm.named_parameters() if p.requires_grad)
    saved = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"adapter_model.safetensors", ilql.HEADS_FILE, ilql.HEADS_CONFIG} <= saved
    assert "model.safetensors" not in saved
    back = ilql.load_ilql(str(tmp_path / "run"))
    assert back.beta == 2.0 and back.generation == m.generation
    prompts = ["dog sun:", "sea hill:"]
    assert back.generate(prompts, seed=3) == m.eval().generate(prompts, seed=3)


@pytest.mark.unit
def test_train_offline_takes_a_loaded_model_and_texts(tiny_gpt2, tmp_path):
    model, tok = load_policy(ModelConfig(name_or_path=tiny_gpt2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    texts = [o for _, o in cat_samples(24)]
    rewards = has_cat(None, texts)
    out = ilql.train_offline(model, texts, rewards, tokenizer=tok, **quick_config(tmp_path / "run", beta=3.0))
    assert isinstance(out, ilql.ILQLModel) and out.lm is model and out.beta == 3.0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())  # trained in place
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["reward_normalization"]["mean"] == approx(sum(rewards) / 24)
    # text samples start from BOS: decoding from no prompt works the same way
    assert len(out.generate([""], seed=0, max_new_tokens=4)) == 1
    # the config forms of rlhfkit.train: a dict with dotted keys, and __ for . in keyword overrides
    bc = ilql.train_offline(model, texts, rewards, tokenizer=tok,
                            config={"method": "filtered_bc", "train.max_steps": 2},
                            train__output_dir=str(tmp_path / "bc"), train__progress=False, top_fraction=0.5,
                            data={"chat_template": "false"})
    assert bc is model
    summary = json.loads((tmp_path / "bc" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["kept_rows"] == 12
    with pytest.raises(UserError, match="pass tokenizer="):
        ilql.train_offline(model, texts, rewards, **quick_config(tmp_path / "x"))


@pytest.mark.unit
def test_rlhfkit_train_with_samples_runs_ilql(tiny_gpt2, tmp_path):
    import rlhfkit

    pairs = cat_samples(16)
    model = rlhfkit.train(tiny_gpt2, samples=pairs, rewards=has_cat(None, [o for _, o in pairs]),
                          config={"train.max_steps": 2, "train.batch_size": 8, "train.progress": False,
                                  "data.chat_template": "false"}, train__output_dir=str(tmp_path / "run"))
    assert isinstance(model, ilql.ILQLModel)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


@pytest.mark.unit
def test_shipped_example_config_data_and_reward():
    # examples/ilql_tiny.yaml loads; the shipped data is what the generator writes; its reward
    # function scores the rows as the data's reward column does
    import importlib.util
    from pathlib import Path

    from rlhfkit.config import load_config
    from rlhfkit.rewards import build_reward

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(ilql.Config, root / "examples" / "ilql_tiny.yaml")
    assert cfg.method == "ilql" and cfg.eval_betas == [0.0, 1.0, 4.0]
    assert cfg.data.path == "examples/data/ilql_synthetic.jsonl"
    spec = importlib.util.spec_from_file_location("ilql_synthetic", root / "examples" / "ilql_synthetic.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rows = [json.loads(line) for line in (root / cfg.data.path).read_text().splitlines()]
    assert rows == gen.make_rows(2000, seed=0)
    assert 0.27 < sum(r["reward"] for r in rows) / len(rows) < 0.33
    reward = build_reward([{**vars(c), "function": str(root / c.function.split(":")[0]) + ":reward"}
                           for c in cfg.eval_reward])
    first = rows[:50]
    assert reward([r["prompt"] for r in first], [r["output"] for r in first]) == [r["reward"] for r in first]


@pytest.mark.unit
def test_keep_freed_memory_stops_page_faults_on_repeated_temporaries():
    # Three 8.5 MB temporaries per iteration are 6,240 fresh pages when glibc hands freed memory
    # back to the OS (measured here: ~6,200 page faults per iteration); kept, almost none.
    import resource

    if not ilql.keep_freed_memory():
        pytest.skip("not glibc")
    x = torch.randn(520, 4096)

    def churn(n: int) -> None:
        for _ in range(n):
            a = x * 2
            b = a.exp()
            c = b + a
            del a, b, c

    churn(10)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn(50)
    per_iteration = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50
    assert per_iteration < 600, per_iteration


@pytest.mark.unit
def test_disable_dropout_zeroes_every_dropout():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2, n_positions=16))
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    ilql.disable_dropout(model)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    model.train()
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # deterministic in train mode


@pytest.mark.unit
def test_fuse_gelu_swaps_gelu_new_for_the_same_function():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.activations import GELUTanh, NewGELUActivation

    # the function itself: values and gradients equal to float rounding, far into both tails
    x = torch.linspace(-12, 12, 2001, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ref, fused = NewGELUActivation()(x), GELUTanh()(x2)
    ref.sum().backward()
    fused.sum().backward()
    assert torch.allclose(fused, ref, rtol=0, atol=1e-12) and torch.allclose(x2.grad, x.grad, rtol=0, atol=1e-12)
    # in a model: every gelu_new replaced, the logits unchanged, a second call finds nothing
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=2, n_head=2, n_positions=16)).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert ilql.fuse_gelu(model) == 2
        assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
        assert torch.allclose(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    assert ilql.fuse_gelu(model) == 0


@pytest.mark.unit
def test_q_heads_at_actions_equal_the_full_heads():
    torch.manual_seed(0)
    for mlp in (False, True):
        heads = ilql.QHeads(hidden=6, vocab=11, n_q=2, mlp=mlp)
        h = torch.randn(3, 4, 6)
        a = torch.randint(0, 11, (3, 4))
        full = heads(h)
        at = heads.at(h, a)
        assert at.shape == (2, 3, 4)
        for i in range(2):
            assert torch.allclose(at[i], full[i].gather(-1, a[..., None]).squeeze(-1), atol=1e-6)


@pytest.mark.unit
def test_target_sync_is_polyak_averaging():
    heads = ilql.ILQLHeads(hidden=2, vocab=3, two_qs=True)
    with torch.no_grad():
        for p in heads.q.parameters():
            p.fill_(1.0)
        for p in heads.target_q.parameters():
            p.fill_(3.0)
    heads.sync_target(0.25)  # 0.25 * 1 + 0.75 * 3 = 2.5
    assert torch.cat([p.flatten() for p in heads.target_q.parameters()]).unique().tolist() == [2.5]
    assert len(list(heads.target_q.parameters())) == 4  # two heads x (weight, bias)
    heads.sync_target(1.0)
    assert torch.cat([p.flatten() for p in heads.target_q.parameters()]).unique().tolist() == [1.0]
    assert not any(p.requires_grad for p in heads.target_q.parameters())
    assert all(p.requires_grad for p in heads.q.parameters())


@pytest.mark.unit
def test_terminal_rewards_and_top_samples_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    r = ilql.terminal_rewards(torch.tensor([2.0, -1.0]), mask)
    assert r.tolist() == [[0.0, 0.0, 2.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]
    ex = [ilql.ScoredExample([1], [2], reward) for reward in (0.5, 3.0, 1.0, 3.0, -2.0)]
    # top 40% of 5 = 2 rows: the two 3.0 rows, earlier first; 50% -> ceil(2.5) = 3 rows
    assert [e.reward for e in ilql.top_samples(ex, 0.4)] == [3.0, 3.0]
    assert [id(e) for e in ilql.top_samples(ex, 0.4)] == [id(ex[1]), id(ex[3])]
    assert [e.reward for e in ilql.top_samples(ex, 0.5)] == [3.0, 3.0, 1.0]


@pytest.mark.unit
def test_rows_text_or_prompt_output_and_bad_rewards(tiny_gpt2, tmp_path):
    from rlhfkit.data import read_table

    tok = tokenizer_of(tiny_gpt2)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "dog cat", "score": 1}, {"text": "sun", "score": "0.5"}])
    cfg = DataConfig(path=path, columns={"reward": "score"})
    samples = ilql.offline_samples(read_table(path), cfg, tok, DataStats())
    assert [(s.prompt, s.output, s.reward) for s in samples] == [("", "dog cat", 1.0), ("", "sun", 0.5)]
    ex = ilql.tokenize_samples(samples, tok, cfg, 64, False, DataStats())
    assert ex[0].prompt_ids == [tok.bos_token_id]  # text rows: the start token is the first state
    assert ex[0].completion_ids[-1] == tok.eos_token_id  # EOS is the last action, carrying the reward
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a:", "output": "dog", "reward": 0},
                                              {"prompt": "b:", "output": "sun", "reward": "high"}])
    with pytest.raises(UserError, match=r"p.jsonl: row 2: column 'reward' must be a number"):
        ilql.offline_samples(read_table(path), DataConfig(path=path), tok, DataStats())
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a:", "output": "dog"}])
    with pytest.raises(UserError, match=r"m.jsonl: row 1: missing column 'reward'"):
        ilql.offline_samples(read_table(path), DataConfig(path=path), tok, DataStats())
    with pytest.raises(UserError, match="2 samples but 1 rewards"):
        ilql.train_offline(tiny_gpt2, ["a", "b"], [1.0], **quick_config(tmp_path / "x"))


@pytest.mark.unit
def test_run_writes_outputs_and_resume_restores_target_heads(tiny_gpt2, tmp_path):
    # A run of 4 steps equals a run resumed from its step-2 checkpoint: weights and target heads.
    from safetensors.torch import load_file

    rows = [{"prompt": p, "output": o, "reward": r} for (p, o), r in
            zip(cat_samples(48), has_cat(None, [o for _, o in cat_samples(48)]))]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    over = quick_config(tmp_path / "a", model=dict(name_or_path=tiny_gpt2), data=dict(path=data, eval_fraction=0.25),
                        train=dict(max_steps=4, checkpoint_every=2, keep_checkpoints=2), tau_target=0.3,
                        eval_reward=[dict(kind="python", function=f"{__file__}:has_cat")], eval_betas=[0.0, 2.0],
                        eval=dict(max_rows=4))
    summary = ilql.run(config(over))
    a = tmp_path / "a"
    assert {"config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", ilql.HEADS_FILE,
            "eval_samples.jsonl"} <= {p.name for p in a.iterdir()}
    assert summary["steps"] == 4 and summary["tokens"] > 0 and set(summary["eval_reward"]) == {"beta=0", "beta=2"}
    assert summary["behaviour_reward_mean"] == approx(sum(r["reward"] for r in rows[:36]) / 36, abs=0.2)
    assert len((a / "eval_samples.jsonl").read_text().splitlines()) == 8

    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(a / "checkpoints" / "step-0000002", b / "checkpoints" / "step-0000002")
    held = load_file(str(b / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    assert any(k.startswith("heads.target_q.") for k in held)  # the moving target heads, beside the trainable
    over_b = merge(over, dict(train=dict(output_dir=str(b)), eval_reward=[]))
    ilql.run(config(over_b), resume=True)
    ha, hb = load_file(str(a / ilql.HEADS_FILE)), load_file(str(b / ilql.HEADS_FILE))
    assert ha.keys() == hb.keys() and all(torch.allclose(ha[k], hb[k], atol=1e-6) for k in ha)
    assert any(k.startswith("target_q.") for k in ha)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # and the saved folder loads back for decoding
    m = ilql.load_ilql(str(a))
    assert len(m.generate(["dog sun:"], beta=1.0, seed=0, max_new_tokens=4)) == 1


def config(over: dict) -> ilql.Config:
    cfg = from_dict(ilql.Config, over)
    validate(cfg)
    return cfg
