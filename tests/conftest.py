"""Shared test fixtures: the tiny model, its tokenizer and one vLLM engine for the session.

Importing this file sets the environment the CPU engines need (only where the
variable is not already set): vLLM's KV cache size, DeepSpeed's CPU
accelerator, no MLflow telemetry, no tokenizer thread pools.

Fixtures (all session-scoped, so the model is written and the engine started
once per test run):

* ``tiny_model_dir`` — a freshly written tiny model (``rollout.tiny.init_model``,
  seed 0) in a temporary directory. Treat it as read-only: write checkpoints
  elsewhere.
* ``tokenizer`` — its tokenizer (``rollout.tiny.load_tokenizer``).
* ``llm`` — ONE ``vllm.LLM`` on that model, fp32 with prefix caching, shared
  by every test that asks for it. A test that loads other weights into it
  (``collective_rpc("reload_weights", ...)``) must load ``tiny_model_dir``
  back and call ``reset_prefix_cache()`` before it ends.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

for _name, _value in {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; vLLM on CPU refuses to start without it
    "DS_ACCELERATOR": "cpu",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rollout.tiny import init_model

    return init_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from rollout.tiny import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def llm(tiny_model_dir: Path):
    """The session's vLLM engine on the tiny model.

    ``enforce_eager`` skips torch.compile (about a minute of start-up on two
    cores, for a model that decodes fast anyway). The engine runs in its own
    processes (vLLM's default engine core and worker), so vLLM's OpenMP thread
    binding and its ``torch.set_num_threads`` patch stay out of the test
    process; do not set ``VLLM_ENABLE_V1_MULTIPROCESSING=0``. Teardown stops
    those processes.
    """
    from vllm import LLM

    engine = LLM(
        model=str(tiny_model_dir),
        dtype="float32",
        enable_prefix_caching=True,
        max_model_len=4096,
        seed=0,
        enforce_eager=True,
    )
    try:
        yield engine
    finally:
        engine.llm_engine.engine_core.shutdown()
        del engine
        gc.collect()
