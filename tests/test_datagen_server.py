"""Stage 1 against a real vLLM OpenAI-compatible server on 127.0.0.1 serving the untrained tiny model.

Its replies are nonsense, so every trace must be rejected with a reason, and nothing may crash; the
re-run must be served from the cache alone. One server for the module (an engine start costs
1-3 minutes on a loaded two-core machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rewards.checker import AnswerChecker
from rl.datagen.stage1 import STEPS, Stage1Config, make_rewriter, run_stage1, summary
from rl.datagen.teacher import TeacherConfig
from rollout.task import TaskConfig, make_dataset

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """``(base_url, model name)`` of a vLLM API server on the tiny model; stopped after the module."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
             "--enforce-eager", "--seed", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server was not up after {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(2)
        yield f"http://127.0.0.1:{port}/v1", str(tiny_model_dir)
    finally:
        # the server and its engine process share the session started above
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_every_trace_is_rejected_with_a_reason_and_the_rerun_is_free(server, tmp_path, capsys):
    base_url, model = server
    records = make_dataset(TaskConfig(), {"train": 4}, seed=11)["train"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = Stage1Config(input=str(src), out=str(tmp_path / "out.jsonl"), progress=False,
                       teacher=TeacherConfig(base_url=base_url, model=model, concurrency=2, max_tokens=16,
                                             temperature=1.0, max_retries=1, timeout_s=120,
                                             cache_dir=str(tmp_path / "cache")))

    def run_once():
        rewriter, client = make_rewriter(cfg)  # preflight: the server lists the model
        try:
            with AnswerChecker(eager=False) as checker:
                return run_stage1(cfg, rewriter, checker, client=client)
        finally:
            client.close()

    first = run_once()
    with capsys.disabled():
        print("\n" + summary(first.stats))
    assert (first.stats["total"], first.stats["kept"]) == (4, 0)
    for o in first.outcomes:
        assert o.response is None and o.rejection.step in STEPS[1:] and o.rejection.detail
    assert sum(first.stats["rejected_by_step"].values()) == 4
    assert first.stats["teacher"]["requests"] >= 4 and first.stats["teacher"]["failed_calls"] == 0
    assert (tmp_path / "out.jsonl").read_text() == ""
    assert len((tmp_path / "out.rejected.jsonl").read_text().splitlines()) == 4

    second = run_once()
    assert second.stats["teacher"]["requests"] == 0
    assert second.stats["teacher"]["cache_hits"] == first.stats["teacher"]["requests"]
    assert [o.rejection for o in second.outcomes] == [o.rejection for o in first.outcomes]
