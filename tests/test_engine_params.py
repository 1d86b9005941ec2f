"""VLLMEngine's sampling parameters: the request's own fields, the engine's settings, and what may override them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rollout.engine import Request, VLLMEngine


def fake_llm(max_model_len: int = 64):
    return SimpleNamespace(llm_engine=SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len)))


def test_request_fields_and_engine_settings():
    p = VLLMEngine(fake_llm())._params(Request([1, 2], 5, [9], temperature=0.5, top_p=0.9, seed=7))
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop_token_ids) == (5, 0.5, 0.9, 7, [9])
    assert (p.logprobs, p.flat_logprobs, p.skip_clone, p.detokenize) == (0, True, True, False)


def test_overrides_add_fields_and_replace_engine_settings_but_not_request_fields():
    engine = VLLMEngine(fake_llm(), sampling_overrides={"allowed_token_ids": [1, 2], "flat_logprobs": False})
    p = engine._params(Request([1], 3))
    assert p.allowed_token_ids == [1, 2] and p.flat_logprobs is False
    with pytest.raises(ValueError, match=r"cannot set \['max_tokens'\]"):
        VLLMEngine(fake_llm(), sampling_overrides={"max_tokens": 9})


def test_cpu_threads_bind_is_the_worker_binding_while_the_engine_is_built(monkeypatch):
    """make_llm hands ``cpu_threads_bind`` to vLLM's worker as VLLM_CPU_OMP_THREADS_BIND while the engine is built
    (the engine core and worker processes start inside ``vllm.LLM``), and leaves the caller's environment as it was."""
    import os

    import vllm
    from vllm.platforms import current_platform

    from rollout.engine import make_llm

    if not current_platform.is_cpu():
        pytest.skip("cpu_threads_bind is a CPU setting")
    seen = {}

    def fake_llm_class(**kwargs):
        seen.update(bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND"), kwargs=kwargs)
        return "llm"

    monkeypatch.setattr(vllm, "LLM", fake_llm_class)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert make_llm("m", max_model_len=64, cpu_threads_bind="0-1") == "llm"
    assert seen["bind"] == "0-1" and seen["kwargs"]["block_size"] == 32
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    make_llm("m", max_model_len=64)
    assert seen["bind"] is None  # vLLM's own default ("auto")
    with pytest.raises(ValueError, match="cpu_threads_bind is for CPU engines with the engine core in its own"):
        make_llm("m", max_model_len=64, in_process=True, cpu_threads_bind="0-1")
