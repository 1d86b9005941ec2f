"""Teacher secrets: the API key and credentials in ``base_url`` never reach a message, a file or a reply.

Stage 1 runs through the command line against a fake teacher on 127.0.0.1 (a
plain ``http.server`` in a thread) that echoes what it received, the
``Authorization`` header and the query string, in every form a secret can take
(as is, URL-encoded, JSON-escaped, Base64 for HTTP Basic), in error bodies and
in replies. Then no file the run wrote and nothing it printed may hold any of
them. The key variable is checked too: a trailing newline is stripped, a key
with whitespace inside is refused without being shown.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, quote_plus

import httpx
import pytest

from cluster.cli import main
from rl.datagen.teacher import (
    TeacherCallError, TeacherClient, TeacherConfig, TeacherConfigError, redact_url, url_secrets,
)

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "datagen" / "teacher_cases.json").read_text())
MODEL = "teacher-model"
KEY = "sk-7d1f/0c2a+9e=x"  # URL-encoding changes it, so its encoded forms are checked separately
USER, PASSWORD, TOKEN = "alice", "p@ss:w0rd", "tok-5e6f7a8b"


def forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}


FORBIDDEN = (forms(KEY) | forms(PASSWORD) | forms(TOKEN)
             | {base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()})


def assert_clean(text: str, where: str) -> None:
    leaked = sorted(f for f in FORBIDDEN if f in text)
    assert not leaked, f"{where} holds {leaked}"


class FakeTeacher(BaseHTTPRequestHandler):
    """Lists the model; answers chat calls in turn with an echo (200, not JSON) and a refusal (``status``)."""

    status = 400
    calls = 0
    seen: list[tuple[str, str | None]] = []

    def echo(self) -> str:
        auth = self.headers.get("Authorization") or ""
        return (f"{auth} | {quote(auth)} | {json.dumps(auth)} | {self.path} | {quote_plus(self.path)} | "
                f"{auth.removeprefix('Bearer ')} |{' ' * 280}| {auth}")  # the last one straddles a 300-char cut

    def send(self, status: int, body: str, json_body: bool = True) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if json_body else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's name
        FakeTeacher.seen.append((self.path, self.headers.get("Authorization")))
        self.send(200, json.dumps({"object": "list", "data": [{"id": MODEL}]}))

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        FakeTeacher.seen.append((self.path, self.headers.get("Authorization")))
        FakeTeacher.calls += 1
        if FakeTeacher.calls % 2:
            content = self.echo()
            self.send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                                    "finish_reason": "stop"}]}))
        else:
            self.send(FakeTeacher.status, self.echo(), json_body=False)

    def log_message(self, *args):
        pass


@pytest.fixture
def teacher():
    """``http://127.0.0.1:PORT``, a fake teacher serving until the test ends."""
    FakeTeacher.calls, FakeTeacher.seen, FakeTeacher.status = 0, [], 400
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTeacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def stage1(tmp_path: Path, base_url: str, *extra: str) -> int:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(FIXTURES["traces"][name]) + "\n" for name in ("arith", "words")))
    return main(["datagen", "stage1", "rewriter=teacher", f"input={src}",
                 f"out={tmp_path / 'out' / 'train.jsonl'}", f"teacher.base_url={base_url}",
                 f"teacher.model={MODEL}", f"teacher.cache_dir={tmp_path / 'cache'}", "teacher.concurrency=1",
                 "teacher.max_retries=0", "progress=false", *extra])


def written(tmp_path: Path) -> dict[str, str]:
    return {str(p.relative_to(tmp_path)): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}


def test_echoed_key_is_nowhere_in_outputs_cache_or_messages(teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TW_TEACHER_KEY", KEY + "\n")  # as mounted from a file: the newline is stripped
    rc = stage1(tmp_path, f"{teacher}/v1", "teacher.api_key_env=TW_TEACHER_KEY")
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "kept 0 of 2 traces" in out and "not_json 1" in out and "teacher_error 1" in out
    assert FakeTeacher.seen[0] == ("/v1/models", f"Bearer {KEY}")  # the stripped key is what is sent
    files = written(tmp_path)
    assert any(name.startswith("cache") for name in files) and "out/train.rejected.jsonl" in files
    for name, text in files.items():
        assert_clean(text, name)
    assert_clean(out + err, "the printed output")
    rejected = files["out/train.rejected.jsonl"]
    assert "Bearer ***" in rejected and "HTTP 400" in rejected  # scrubbed, not dropped
    cached = [json.loads(t) for n, t in files.items() if n.startswith("cache")]
    assert len(cached) == 1 and cached[0]["content"].startswith("Bearer *** | ")  # the echo, scrubbed, cached


def test_credentials_in_base_url_are_sent_but_never_stored_or_shown(teacher, tmp_path, capsys):
    host = teacher.removeprefix("http://")
    url = f"http://{USER}:{quote(PASSWORD, safe='')}@{host}/v1?token={TOKEN}"
    rc = stage1(tmp_path, url)
    out, err = capsys.readouterr()
    assert rc == 0, err
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert FakeTeacher.seen[0] == (f"/v1/models?token={TOKEN}", basic)
    assert FakeTeacher.seen[1][0] == f"/v1/chat/completions?token={TOKEN}"  # query values go with every call
    for name, text in written(tmp_path).items():
        assert_clean(text, name)
    assert_clean(out + err, "the printed output")
    stats = json.loads((tmp_path / "out" / "train.stats.json").read_text())
    assert stats["config"]["teacher"]["base_url"] == f"http://***@{host}/v1?token=***"


def test_a_refusing_teacher_echoing_the_key_stops_with_a_scrubbed_message(teacher, tmp_path, monkeypatch, capsys):
    FakeTeacher.status = 401
    monkeypatch.setenv("TW_TEACHER_KEY", KEY)
    rc = stage1(tmp_path, f"{teacher}/v1?token={TOKEN}", "teacher.api_key_env=TW_TEACHER_KEY")
    out, err = capsys.readouterr()
    assert rc == 2 and "refused the call: HTTP 401" in err and "Bearer ***" in err
    assert f"{teacher}/v1?token=***" in err
    assert_clean(out + err, "the printed output")
    for name, text in written(tmp_path).items():
        assert_clean(text, name)


@pytest.mark.parametrize("value", [KEY[:5] + " " + KEY[5:], KEY + "\nsecond-line", KEY[:5] + "\t" + KEY[5:],
                                   KEY + "\x07", KEY + "é"])
def test_a_key_with_whitespace_or_control_characters_inside_is_refused_unseen(value, tmp_path, monkeypatch,
                                                                               capsys):
    monkeypatch.setenv("TW_TEACHER_KEY", value)
    assert stage1(tmp_path, "http://127.0.0.1:9/v1", "teacher.api_key_env=TW_TEACHER_KEY") == 2
    out, err = capsys.readouterr()
    assert "TW_TEACHER_KEY" in err and "not shown" in err and len(err.strip().splitlines()) == 1
    for part in (KEY[:5], KEY[5:], "second-line"):
        assert part not in out + err


def test_empty_key_variable_is_refused(monkeypatch):
    monkeypatch.setenv("TW_TEACHER_KEY", " \n")
    with pytest.raises(TeacherConfigError, match="TW_TEACHER_KEY .* is not set or empty"):
        TeacherClient(TeacherConfig(model=MODEL, api_key_env="TW_TEACHER_KEY"))


def test_every_form_of_a_secret_is_scrubbed_before_a_message_is_cut(monkeypatch):
    monkeypatch.setenv("TW_TEACHER_KEY", KEY)
    body = "x" * 290 + KEY  # a cut at 300 characters would keep the key's first 10
    client = TeacherClient(TeacherConfig(base_url="http://t.test/v1", model=MODEL, cache_dir=None, max_retries=0,
                                         api_key_env="TW_TEACHER_KEY"),
                           transport=httpx.MockTransport(lambda r: httpx.Response(400, text=body)))
    with pytest.raises(TeacherCallError) as e:
        client.chat([{"role": "user", "content": "hi"}])
    assert str(e.value).endswith("x***") and KEY[:10] not in str(e.value)
    for form in forms(KEY):
        assert client.scrub(f"a {form} b") == "a *** b"


def test_redacted_urls_and_their_secrets():
    url = f"https://{USER}:{quote(PASSWORD, safe='')}@api.test:8443/v1?token={TOKEN}&v=2#frag"
    assert redact_url(url) == "https://***@api.test:8443/v1?token=***&v=***#***"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert {USER, PASSWORD, f"{USER}:{PASSWORD}", TOKEN} <= set(url_secrets(url))
    assert url_secrets("http://127.0.0.1:8000/v1") == []
