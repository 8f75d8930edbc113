"""No deprecated transformers API: the pytest configuration turns deprecation warnings raised from
rlhfkit's frames (and transformers' renamed-keyword warnings from anywhere) into errors; these tests
check that it really does, and that the generation path passes the KV cache by its current name."""
from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = pytest.mark.unit


def _warn_from_module(module_name: str, category: type) -> None:
    """Issue ``category`` from code whose module is ``module_name`` (what filters match)."""
    code = compile(f"import warnings\nwarnings.warn('old api', {category.__name__})\n", f"<{module_name}>", "exec")
    exec(code, {"__name__": module_name})


@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
def test_deprecation_raised_from_an_rlhfkit_module_is_an_error(category):
    with pytest.raises(category, match="old api"):
        _warn_from_module("rlhfkit.rollout", category)
    with pytest.warns(category, match="old api"):  # another library's own deprecation stays a warning
        _warn_from_module("somelib.module", category)


def test_old_cache_keyword_in_rlhfkit_generation_fails_and_is_attributed_to_rlhfkit(tiny_llama, monkeypatch):
    """Put the deprecated keyword back into generation.generate_ids: the test fails with the warning,
    and the warning's frame is rlhfkit/generation.py (so the module rule alone would catch it)."""
    import rlhfkit.generation as generation
    from rlhfkit.config import GenerationConfig, ModelConfig
    from rlhfkit.models import cache_kwarg, load_policy

    model, tok = load_policy(ModelConfig(name_or_path=tiny_llama))
    if cache_kwarg(model) != "cache":
        pytest.skip("this transformers still calls it past_key_values")
    monkeypatch.setattr(generation, "cache_kwarg", lambda m: "past_key_values")
    gen = GenerationConfig(max_new_tokens=3, do_sample=False)
    with pytest.raises(FutureWarning, match="`past_key_values` is deprecated"):
        generation.generate_ids(model, tok, [[5, 6, 7]], gen)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        generation.generate_ids(model, tok, [[5, 6, 7]], gen)
    hits = [w for w in seen if "past_key_values" in str(w.message)]
    assert hits and all(w.filename.endswith("rlhfkit/generation.py") for w in hits), [(w.filename, str(w.message)) for w in seen]


def test_renamed_transformers_keyword_through_forward_is_an_error(tiny_llama):
    """``model(past_key_values=...)`` warns from torch's Module.__call__ frame, not the caller's:
    the message filter catches it wherever it comes from (transformers >= 5.24 renames it)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from rlhfkit.models import cache_kwarg

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    if cache_kwarg(model) != "cache":
        pytest.skip("this transformers still calls it past_key_values")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(FutureWarning, match="`past_key_values` is deprecated"):
        model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True)  # the current name: silent


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_generation_with_shared_prefill_uses_the_current_cache_keyword(fixture, request):
    """Repeated prompts take the shared-prefill path (a forward with the cache) and then generate
    with it: neither may warn. Equal outputs with and without the shared prefill (greedy)."""
    from rlhfkit.config import GenerationConfig, ModelConfig
    from rlhfkit.models import load_policy
    from rlhfkit.generation import generate_ids

    model, tok = load_policy(ModelConfig(name_or_path=request.getfixturevalue(fixture)))
    gen = GenerationConfig(max_new_tokens=6, do_sample=False)
    prompts = [[5, 6, 7, 8], [5, 6, 7, 8], [9, 10, 11], [9, 10, 11]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        shared = generate_ids(model, tok, prompts, gen)
    single = [generate_ids(model, tok, [p], gen)[0] for p in prompts[::2]]
    assert shared == [single[0], single[0], single[1], single[1]]


def test_console_shows_each_library_warning_once(capsys):
    """The console's showwarning prints a (category, message) once per process, even when warning
    registries are reset between iterations (any catch_warnings or filter change resets them)."""
    from rlhfkit.utils import _SHOWN_WARNINGS, _show_warning_once

    _SHOWN_WARNINGS.discard((FutureWarning, "per-iteration library warning"))
    for _ in range(3):
        warnings.resetwarnings()  # what a library's catch_warnings does to the registries
        warnings.filterwarnings("ignore", message="never matches anything")
        _show_warning_once(FutureWarning("per-iteration library warning"), FutureWarning, "lib.py", 7)
    err = capsys.readouterr().err
    assert err.count("per-iteration library warning") == 1 and "lib.py:7: FutureWarning" in err


def test_log_lines_follow_the_current_stderr(capsys):
    """[rlhfkit] lines go to whatever sys.stderr is now (through tqdm.write), not a stream captured
    when logging was set up."""
    from rlhfkit.utils import logger, setup_logging

    setup_logging()
    logger.info("first line")
    assert capsys.readouterr().err == "[rlhfkit] first line\n"
    from tqdm import tqdm

    bar = tqdm(total=3, desc="bar", file=__import__("sys").stderr)
    logger.info("second line")
    bar.close()
    assert "[rlhfkit] second line\n" in capsys.readouterr().err
