"""Stage 1 with a teacher: the HTTP client (retries, backoff, cache, concurrency, key hygiene) and the
five steps over recorded teacher replies (tests/fixtures/datagen/teacher_cases.json), one case per
success and failure path. The HTTP layer is httpx's MockTransport; no server runs here."""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from rewards.checker import AnswerChecker
from rl.datagen.rewrite import PROMPTS, RewriteConfig, TeacherRewriter, parse_json_object
from rl.datagen.stage1 import Stage1Config, make_rewriter, process, run_stage1
from rl.datagen.teacher import (
    CallCache, TeacherCallError, TeacherClient, TeacherConfig, TeacherConfigError, cache_key,
)
from rl.datagen.trace import Reject
from rollout.format import is_valid

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "datagen" / "teacher_cases.json").read_text())
MODEL = "teacher-model"
SECRET = "sk-test-7d1f0c2a9e"  # a fake key: it must never reach a file, a stat or a message


def completion(content: str, finish: str = "stop") -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}]}


def step_of(body: dict) -> str:
    """Which of the four questions a request asks (each question's first words are unique)."""
    user = body["messages"][-1]["content"]
    for step, question in PROMPTS.items():
        if question.split("{")[0][:30] in user:
            return step
    raise AssertionError(f"unknown question: {user[-200:]}")


class FixtureTeacher:
    """A transport that answers each step with a recorded or hand-written reply."""

    def __init__(self, replies: dict):
        self.replies = replies
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL}]})
        step = step_of(json.loads(request.content))
        with self.lock:
            self.calls.append(step)
        reply = self.replies[step]
        if isinstance(reply, str):
            return httpx.Response(200, json=completion(reply))
        if "recorded" in reply:
            rec = FIXTURES["recorded"][reply["recorded"]]
            return httpx.Response(rec["status"], json=rec["body"])
        return httpx.Response(reply["status"], json=reply["body"])


def client_for(handler, tmp_path: Path | None = None, **kw) -> TeacherClient:
    cfg = TeacherConfig(base_url="http://teacher.test/v1", model=MODEL, cache_dir=str(tmp_path / "cache")
                        if tmp_path else None, **kw)
    return TeacherClient(cfg, transport=httpx.MockTransport(handler), sleep=lambda s: None)


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(eager=False) as c:
        yield c


# ---------------------------------------------------------------------------- the client


def test_retries_back_off_exponentially_and_honour_retry_after():
    statuses = iter([429, 503, 500, 200])
    sleeps: list[float] = []

    def handler(request):
        status = next(statuses)
        headers = {"retry-after": "7"} if status == 503 else {}
        return httpx.Response(status, json=completion("ok") if status == 200 else {"error": "busy"}, headers=headers)

    cfg = TeacherConfig(base_url="http://t/v1", model=MODEL, cache_dir=None, backoff_s=1.0, max_backoff_s=30)
    client = TeacherClient(cfg, transport=httpx.MockTransport(handler), sleep=sleeps.append)
    assert client.chat([{"role": "user", "content": "hi"}]).content == "ok"
    assert len(sleeps) == 3
    assert 1.0 <= sleeps[0] < 1.25 and sleeps[1] == 7 and 4.0 <= sleeps[2] < 5.0  # 1, max(2, Retry-After 7), 4
    assert client.stats.to_dict() == {"requests": 4, "cache_hits": 0, "retries": 3, "failed_calls": 0}


def test_timeouts_are_retried_and_exhaustion_is_a_call_error():
    def handler(request):
        raise httpx.ReadTimeout("slow", request=request)

    client = client_for(handler, max_retries=2)
    with pytest.raises(TeacherCallError, match="gave up after 3 attempts; last: ReadTimeout"):
        client.chat([{"role": "user", "content": "hi"}])
    assert client.stats.requests == 3 and client.stats.failed_calls == 1


def test_backoff_is_capped():
    client = client_for(lambda r: None, backoff_s=1.0, max_backoff_s=5.0)
    for attempt, base in [(0, 1.0), (1, 2.0), (2, 4.0)]:
        assert base <= client.delay(attempt, None) < 1.25 * base
    assert 5.0 <= client.delay(10, None) < 6.25 and client.delay(0, "999") == 5.0


@pytest.mark.parametrize("status, error", [(400, TeacherCallError), (422, TeacherCallError),
                                           (401, TeacherConfigError), (403, TeacherConfigError),
                                           (404, TeacherConfigError)])
def test_client_errors_are_not_retried(status, error):
    client = client_for(lambda r: httpx.Response(status, json={"error": {"message": "no"}}))
    with pytest.raises(error, match=f"HTTP {status}"):
        client.chat([{"role": "user", "content": "hi"}])
    assert client.stats.requests == 1 and client.stats.retries == 0


def test_a_body_that_is_not_a_chat_completion_is_a_call_error():
    client = client_for(lambda r: httpx.Response(200, json={"choices": []}))
    with pytest.raises(TeacherCallError, match="not a chat completion"):
        client.chat([{"role": "user", "content": "hi"}])


def test_concurrency_is_bounded():
    cfg_concurrency = 3
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def handler(request):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return httpx.Response(200, json=completion("x"))

    client = client_for(handler, concurrency=cfg_concurrency)
    threads = [threading.Thread(target=client.chat, args=([{"role": "user", "content": str(i)}],))
               for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert client.stats.requests == 12
    assert 2 <= state["max"] <= cfg_concurrency


def test_cache_makes_a_rerun_free_and_holds_no_key(tmp_path, monkeypatch):
    monkeypatch.setenv("TW_TEST_KEY", SECRET)
    seen = []

    def handler(request):
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json=completion("cached reply"))

    messages = [{"role": "user", "content": "hi"}]
    client = client_for(handler, tmp_path, api_key_env="TW_TEST_KEY")
    assert client.chat(messages).cached is False
    again = client_for(handler, tmp_path, api_key_env="TW_TEST_KEY")
    reply = again.chat(messages)
    assert reply.cached and reply.content == "cached reply"
    assert seen == [f"Bearer {SECRET}"] and again.stats.requests == 0 and again.stats.cache_hits == 1
    # a different parameter is a different call
    assert client_for(handler, tmp_path, api_key_env="TW_TEST_KEY", temperature=0.7).chat(messages).cached is False
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 2 and all(SECRET not in f.read_text() for f in files)
    key = cache_key(MODEL, messages, client.params())
    assert CallCache(tmp_path / "cache").get(key)["content"] == "cached reply"


def test_the_key_is_scrubbed_from_error_messages(monkeypatch):
    monkeypatch.setenv("TW_TEST_KEY", SECRET)
    client = client_for(lambda r: httpx.Response(400, text=f"bad key {SECRET}"), api_key_env="TW_TEST_KEY")
    with pytest.raises(TeacherCallError) as e:
        client.chat([{"role": "user", "content": "hi"}])
    assert SECRET not in str(e.value) and "bad key ***" in str(e.value)


def test_missing_key_variable_and_model_are_config_errors(monkeypatch):
    monkeypatch.delenv("TW_TEST_KEY", raising=False)
    with pytest.raises(TeacherConfigError, match="TW_TEST_KEY"):
        TeacherClient(TeacherConfig(model=MODEL, api_key_env="TW_TEST_KEY"))
    with pytest.raises(TeacherConfigError, match="teacher.model is empty"):
        TeacherClient(TeacherConfig())


def test_preflight():
    def lists(*names):
        return lambda r: httpx.Response(200, json={"object": "list", "data": [{"id": n} for n in names]})

    assert client_for(lists(MODEL, "other")).preflight() == [MODEL, "other"]
    with pytest.raises(TeacherConfigError, match="does not serve model 'teacher-model'; it serves: other"):
        client_for(lists("other")).preflight()
    with pytest.raises(TeacherConfigError, match="HTTP 401"):
        client_for(lambda r: httpx.Response(401, json={})).preflight()

    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(TeacherConfigError, match="unreachable"):
        client_for(refuse).preflight()


def test_json_replies_are_found_in_fences_and_prose():
    assert parse_json_object('```json\n{"a": 1}\n```', "find", "stop") == {"a": 1}
    assert parse_json_object('Sure: {"a": [1, 2]} hope it helps', "find", "stop") == {"a": [1, 2]}
    with pytest.raises(Reject, match="cut at max_tokens"):
        parse_json_object('{"a": [1, ', "cut", "length")
    with pytest.raises(Reject, match="not a JSON object"):
        parse_json_object("[1, 2]", "cut", "stop")


# ---------------------------------------------------------------------------- the five steps over fixtures


STEP_ORDER = ["find", "cut", "decouple", "outline"]


def run_case(case: dict, checker, tmp_path=None):
    trace = FIXTURES["traces"][case["trace"]]
    good = FIXTURES["good"]["words" if case["trace"] == "words" else "arith"]
    teacher = FixtureTeacher({**good, **case["replies"]})
    client = client_for(teacher, tmp_path, max_retries=2)
    cfg = Stage1Config(input="-", out="-", rewrite=RewriteConfig(**case["rewrite"]), teacher=client.cfg)
    outcome = process(0, copy.deepcopy(trace), cfg, TeacherRewriter(client, cfg.rewrite), checker)
    return outcome, teacher


@pytest.mark.parametrize("case", FIXTURES["cases"], ids=[c["name"] for c in FIXTURES["cases"]])
def test_each_step_success_and_failure(case, checker):
    outcome, teacher = run_case(case, checker)
    if case["expect"] == "kept":
        assert outcome.rejection is None and is_valid(outcome.response)
        assert teacher.calls == STEP_ORDER
        return
    step, code = case["expect"]
    assert outcome.response is None and outcome.rejection is not None
    assert (outcome.rejection.step, outcome.rejection.code) == (step, code), outcome.rejection.detail
    assert outcome.rejection.detail
    # the steps after the failing one never ask the teacher (a 503 is asked 1 + max_retries times)
    asked = STEP_ORDER[:STEP_ORDER.index(step) + 1] if step in STEP_ORDER else []
    if step == "find" and code == "too_few_steps" or step == "input":
        asked = []
    if step == "validate":
        asked = STEP_ORDER
    assert sorted(set(teacher.calls), key=STEP_ORDER.index) == asked


def test_every_step_has_a_failure_case_and_both_layouts_succeed():
    expected = {tuple(c["expect"]) if c["expect"] != "kept" else ("kept", c["trace"]) for c in FIXTURES["cases"]}
    steps = {e[0] for e in expected}
    assert {"input", "find", "cut", "decouple", "outline", "validate", "kept"} <= steps
    assert {("kept", "arith"), ("kept", "words")} <= expected


def test_success_outputs_match_the_expected_parallel_text(checker):
    outcome, _ = run_case(FIXTURES["cases"][0], checker)
    assert outcome.response == (
        "<think>\n<Parallel>\n<Outlines>\n<Outline>1: 7*123</Outline>\n<Outline>2: 5*406</Outline>\n"
        "<Outline>3: 3*789</Outline>\n</Outlines>\n<Thread>\n1: 7*123: 7*3=0021, 7*20=0140, 7*100=0700, "
        "0021+0140=0161, 0161+0700=0861\n</Thread>\n<Thread>\n2: 5*406: 5*6=0030, 5*400=2000, 0030+2000=2030\n"
        "</Thread>\n<Thread>\n3: 3*789: 3*9=0027, 3*80=0240, 3*700=2100, 0027+0240=0267, 0267+2100=2367\n"
        "</Thread>\n</Parallel>\n00861+02030=02891\n02891+02367=05258\n</think>\n\n\\boxed{5258}")
    words = next(c for c in FIXTURES["cases"] if c["trace"] == "words")
    outcome, _ = run_case(words, checker)
    assert "2: Notebooks: 2 notebooks at 5 dollars" in outcome.response and "above" not in outcome.response
    assert outcome.response.endswith("</Parallel>\n\nTotal: 12 + 10 = 22 dollars.\n</think>\n\nShe pays "
                                     "\\boxed{22} dollars.")


def test_run_with_a_teacher_counts_per_step_and_reruns_from_cache(tmp_path, monkeypatch, checker):
    """Several traces at concurrency 3: stats per step; the re-run sends no request; the key is nowhere."""
    monkeypatch.setenv("TW_TEST_KEY", SECRET)
    arith = FIXTURES["traces"]["arith"]
    records = [dict(arith, id=f"a{i}") for i in range(4)]
    records += [dict(FIXTURES["traces"]["arith_wrong_reference"], id="wrong"),
                dict(FIXTURES["traces"]["one_step"], id="short")]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))

    def run_once():
        teacher = FixtureTeacher(FIXTURES["good"]["arith"])
        cfg = Stage1Config(input=str(src), out=str(tmp_path / "out.jsonl"), progress=False,
                           teacher=TeacherConfig(base_url="http://teacher.test/v1", model=MODEL, concurrency=3,
                                                 api_key_env="TW_TEST_KEY", cache_dir=str(tmp_path / "cache")))
        rewriter, client = make_rewriter(cfg, transport=httpx.MockTransport(teacher), sleep=lambda s: None)
        return run_stage1(cfg, rewriter, checker, client=client), teacher

    first, teacher = run_once()
    assert (first.stats["total"], first.stats["kept"]) == (6, 4)
    assert first.stats["rejected"] == {"find": {"too_few_steps": 1}, "validate": {"wrong_answer": 1}}
    # the four kept traces and the wrong one ask the same four questions: 4 distinct calls, the rest cached
    assert first.stats["teacher"]["requests"] + first.stats["teacher"]["cache_hits"] == 20
    assert first.stats["teacher"]["requests"] >= 4
    second, teacher2 = run_once()
    assert second.stats["teacher"]["requests"] == 0 and teacher2.calls == []
    assert second.stats["teacher"]["cache_hits"] == 20
    assert [o.response for o in second.outcomes] == [o.response for o in first.outcomes]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 3 and all(SECRET not in p.read_text() for p in written)
    assert json.loads((tmp_path / "out.stats.json").read_text())["config"]["teacher"]["api_key_env"] == "TW_TEST_KEY"


def test_a_refusing_teacher_stops_the_run(tmp_path, checker):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(dict(FIXTURES["traces"]["arith"], id=str(i))) + "\n" for i in range(5)))
    cfg = Stage1Config(input=str(src), out=str(tmp_path / "out.jsonl"), progress=False,
                       teacher=TeacherConfig(model=MODEL, concurrency=2, cache_dir=None, preflight=False))
    rewriter, client = make_rewriter(cfg, transport=httpx.MockTransport(lambda r: httpx.Response(401, json={})))
    with pytest.raises(TeacherConfigError, match="HTTP 401"):
        run_stage1(cfg, rewriter, checker, client=client)
