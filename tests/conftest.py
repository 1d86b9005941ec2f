"""Shared test fixtures: the tiny model, its tokenizer and one vLLM engine for the session.

Importing this file sets the environment the CPU engines need (only where the
variable is not already set): vLLM's KV cache size, DeepSpeed's CPU
accelerator, no MLflow telemetry, no tokenizer thread pools.

Fixtures (all session-scoped, so the model is written and the engine started
once per test run):

* (automatic) ``MLFLOW_TRACKING_URI`` names a store of the test session, unless
  it is set: runs that track by default never land in the repository's
  ``runs/mlflow.db``.
* ``tiny_model_dir`` — a freshly written tiny model (``rollout.tiny.init_model``,
  seed 0) in a temporary directory. Treat it as read-only: write checkpoints
  elsewhere.
* ``tokenizer`` — its tokenizer (``rollout.tiny.load_tokenizer``).
* ``llm`` — ONE ``vllm.LLM`` on that model, fp32 with prefix caching, shared
  by every test that asks for it, built by ``rollout.engine.make_llm``. A test
  that loads other weights into it must use ``rollout.weights.reload_in_place``
  (plain ``reload_weights`` leaves vLLM CPU's tied output head stale) and load
  ``tiny_model_dir`` back before it ends.
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


@pytest.fixture(scope="session", autouse=True)
def session_tracking_store(tmp_path_factory: pytest.TempPathFactory):
    if "MLFLOW_TRACKING_URI" in os.environ:
        yield os.environ["MLFLOW_TRACKING_URI"]
        return
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


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
    from rollout.engine import make_llm

    # make_llm: fp32, prefix caching on, and the reload extension that
    # rollout.weights.reload_in_place needs (vLLM's CPU backend otherwise keeps
    # a stale tied output head after an in-place reload).
    engine = make_llm(tiny_model_dir, max_model_len=4096, seed=0, dtype="float32", enforce_eager=True)
    try:
        yield engine
    finally:
        engine.llm_engine.engine_core.shutdown()
        del engine
        gc.collect()


@pytest.fixture
def bare_rl_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder holding only an empty ``config.json`` and a data folder of one-line train/validation files:
    enough for the input checks of ``rl``/``sweep``, which refuse before anything loads them."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        (data / name).write_text('{"prompt": "Compute 2*3.", "answer": "6"}\n')
    return model, data
