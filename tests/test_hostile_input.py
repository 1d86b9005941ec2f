"""Hostile input to ``check``, ``score`` and ``view``: every case is answered, none crashes, hangs or explodes.

The corpus is generated here: JSON nested 100,000 deep, lone surrogates, bytes
that are not UTF-8, integers of 5000 digits, outline and thread numbers of 5000
digits, 10,000 threads in one block, 100,000 (a 6 MB record), too many blocks
(50,000 nested ones), too many bytes, ``units`` of the wrong types,
``score --timeout nan|inf|-1|0``, a tokenizer that splits the control tags, a
missing tokenizer folder, markup in every field the viewer shows.

Bad input or usage: one line on stderr and exit code 2. A per-record problem
(a response over a structural limit): a reason in that record's output, exit
code 1 from ``check``; ``score`` scores such a record (not format-valid, the
reason in ``format_error``, no token measures) and ``view`` shows it as raw
text under the reason. Every case takes at most the reward's time limit + 1 s
per record. The 6 MB record, a large valid one (40 blocks of 64 threads,
whose check took 2.9 GB peak when every unit copied its context) and the
largest valid one (just under the size limit, a million byte tokens) run in a
subprocess that reports its peak RSS, which must stay under 1 GiB; an
address-space cap makes a regression fail fast instead of filling the machine.
The viewer's escaping of every field is tested in headless Chromium at the end.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.viewer import CSP_META, render
from rewards.config import RewardConfig
from rl.sft_data import build_tries
from rollout.tiny import build_tokenizer
from rollout.units import Unit
from tests.test_viewer import CHROMIUM, _shown, chromium_dom

REPO = Path(__file__).resolve().parents[1]
#: Time allowed per record: the reward's time limit (math-verify) + 1 s.
SECONDS_PER_RECORD = RewardConfig().checker_timeout_s + 1
MAX_PEAK_KB = 1 << 20  # 1 GiB
OK_RESPONSE = "<think>\nx\n</think>\n\\boxed{1}"


def _block(k: int, body: str, outline: str = "o") -> str:
    outlines = "".join(f"<Outline>{i}: {outline}</Outline>\n" for i in range(1, k + 1))
    threads = "".join(f"<Thread>\n{i}: {body}\n</Thread>\n" for i in range(1, k + 1))
    return f"<Parallel>\n<Outlines>\n{outlines}</Outlines>\n{threads}</Parallel>\n"


def _think(middle: str) -> str:
    return f"<think>\n{middle}</think>\n\\boxed{{1}}"


def _line(response=OK_RESPONSE, **extra) -> str:
    return json.dumps({"prompt": "p", "response": response, "answer": "1", **extra}) + "\n"


DIGITS = "1" * 5000
# name -> file content (str, or bytes for what is not UTF-8)
CORPUS: dict[str, str | bytes] = {
    "ok": _line(),
    "deep_json": '{"response": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
    "deep_json_200": '{"response": "x", "answer": "1", "extra": ' + "[" * 200 + "]" * 200 + "}\n",
    "huge_json_integer": '{"response": "x", "answer": ' + DIGITS + "}\n",
    "surrogate_prompt": '{"prompt": "a\\ud800b", "response": "x", "answer": "1"}\n',
    "surrogate_response": '{"response": "x\\udc00", "answer": "1"}\n',
    "not_utf8": b'{"response": "\xff\xfe", "answer": "1"}\n',
    "prompt_not_string": _line(prompt=["p"]),
    "prompt_too_long": _line(prompt="\u20ac" * 333_334),
    "digits": _line(_think(f"<Parallel>\n<Outlines>\n<Outline>{DIGITS}: a</Outline>\n</Outlines>\n"
                           f"<Thread>\n{DIGITS}: b\n</Thread>\n</Parallel>\n")),
    "reference_digits": _line(_think(_block(2, "use thread " + DIGITS))),
    "threads_10k": _line(_think(_block(10_000, "yyyy"))),
    "blocks_300": _line(_think(_block(1, "b") * 300)),
    "blocks_nested_50k": _line(_think("<Parallel>" * 50_000)),
    "bytes_1m": _line(_think("x" * 1_000_000)),
    "bytes_1m_of_4_byte_characters": _line(_think("\U0001F600" * 250_000)),
    "units_string": _line(units="abc"),
    "units_number": _line(units=5),
    "units_list_of_numbers": _line(units=[5]),
    "units_context_number": _line(units=[{"context_ids": 5, "completion_ids": [1]}]),
    "units_ids_strings": _line(units=[{"context_ids": [1], "completion_ids": ["a"]}]),
    "units_negative_id": _line(units=[{"context_ids": [1], "completion_ids": [-1]}]),
    "units_thread_without_block": _line(units=[{"context_ids": [1], "completion_ids": [1], "role": "thread"}]),
    "units_block_string": _line(units=[{"context_ids": [1], "completion_ids": [1], "role": "thread",
                                        "block": "<script>", "thread": 1}]),
    "units_bad_role": _line(units=[{"context_ids": [1], "completion_ids": [1], "role": "<b>"}]),
    "units_n_inserted": _line(units=[{"context_ids": [1], "completion_ids": [1], "n_inserted": 5}]),
    "units_logprobs": _line(units=[{"context_ids": [1], "completion_ids": [1, 2], "completion_logprobs": [0.5]}]),
    "units_unknown_field": _line(units=[{"context_ids": [1], "completion_ids": [1], "oops": 1}]),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    paths = {}
    for name, content in CORPUS.items():
        path = root / f"{name}.jsonl"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        paths[name] = path
    good = root / "tok"
    build_tokenizer().save_pretrained(good)
    paths["tok"] = good
    paths["tok_split_tags"] = _split_tags_tokenizer(root / "tok_split_tags")
    paths["no_tok"] = root / "missing_tokenizer"
    paths["out"] = root / "page.html"
    return paths


def _split_tags_tokenizer(path: Path) -> Path:
    """A byte tokenizer with a chat template but without the control tags: each tag is several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from rollout.tiny import CHAT_TEMPLATE, IM_END

    byte_to_char = bytes_to_unicode()
    backend = Tokenizer(models.BPE(vocab={byte_to_char[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def _run(capsys, argv: list) -> tuple[int, str, str]:
    """Run ``threadweaver ARGV`` in this process; its exit code, stdout and stderr, within the time allowed."""
    start = time.perf_counter()
    code = main([str(a) for a in argv])
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert seconds <= SECONDS_PER_RECORD, f"{argv[0]} took {seconds:.1f} s for one record"
    return code, out, err


# (command, corpus file, extra arguments (corpus names in braces), message on stderr)
BAD_INPUT = [
    *[(cmd, name, message) for cmd in ("check", "score", "view") for name, message in [
        ("deep_json", "nested more than 64 levels deep"),
        ("deep_json_200", "nested more than 64 levels deep"),
        ("huge_json_integer", "not valid JSON (Exceeds the limit (4300 digits)"),
        ("surrogate_prompt", "lone surrogate (U+D800)"),
        ("surrogate_response", "lone surrogate (U+DC00)"),
        ("not_utf8", "not UTF-8 text"),
    ]],
    ("check", "prompt_not_string", "field 'prompt' must be a string, got list"),
    ("score", "prompt_not_string", "field 'prompt' must be a string, got list"),
    ("check", "prompt_too_long", "field 'prompt' has 1000002 bytes (UTF-8), more than the limit of 1000000"),
    ("score", "prompt_too_long", "field 'prompt' has 1000002 bytes (UTF-8), more than the limit of 1000000"),
    *[(cmd, name, message) for cmd in ("score", "view") for name, message in [
        ("units_string", "field 'units': expected a list of unit objects, got str"),
        ("units_number", "field 'units': expected a list of unit objects, got int"),
        ("units_list_of_numbers", "field 'units': unit 0: expected a unit object, got int"),
        ("units_context_number", "unit 0: field 'context_ids' must be a list of token ids"),
        ("units_ids_strings", "unit 0: field 'completion_ids' must be a list of token ids"),
        ("units_negative_id", "unit 0: field 'completion_ids' must be a list of token ids"),
        ("units_thread_without_block", "unit 0: a thread unit needs an integer 'block'"),
        ("units_block_string", "unit 0: field 'block' must be null or an integer"),
        ("units_bad_role", "unit 0: field 'role' must be 'seq' or 'thread'"),
        ("units_n_inserted", "unit 0: field 'n_inserted' must be an integer from 0 to the context length"),
        ("units_logprobs", "unit 0: field 'completion_logprobs' must be null or one number per completion token"),
        ("units_unknown_field", "unit 0: unknown field 'oops'"),
    ]],
]


def _argv(cmd: str, name: str, corpus: dict[str, Path], tokenizer: str = "tok") -> list:
    argv = [cmd, corpus[name]]
    if cmd in ("check", "score"):
        argv += ["--tokenizer", corpus[tokenizer]]
    if cmd == "view":
        argv += ["--out", corpus["out"], "--tokenizer", corpus[tokenizer]]
    return argv


@pytest.mark.parametrize("cmd, name, message", BAD_INPUT, ids=[f"{c}-{n}" for c, n, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(capsys, corpus, cmd, name, message):
    code, out, err = _run(capsys, _argv(cmd, name, corpus))
    assert code == 2
    assert err.startswith(f"threadweaver {cmd}: ") and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("cmd", ["check", "score", "view"])
@pytest.mark.parametrize("tokenizer, message", [
    ("tok_split_tags", "the tokenizer splits the tags <Parallel>"),
    ("no_tok", "missing_tokenizer does not exist"),
])
def test_unusable_tokenizer_is_a_usage_error(capsys, corpus, cmd, tokenizer, message):
    code, out, err = _run(capsys, _argv(cmd, "ok", corpus, tokenizer))
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("timeout", ["nan", "inf", "-1", "0"])
def test_score_timeout_must_be_positive_and_finite(capsys, corpus, timeout):
    code, out, err = _run(capsys, ["score", corpus["ok"], f"reward.checker_timeout_s={timeout}"])
    assert code == 2 and err.startswith("threadweaver score: ") and "reward.checker_timeout_s" in err, err
    assert len(err.splitlines()) == 1 and "> 0" in err, err


# (corpus file, the reason that record gets)
OVER_A_LIMIT = [
    ("digits", "outline number with 5000 digits, more than 9"),
    ("threads_10k", "block 1: 10000 threads, more than the limit of 64"),
    ("blocks_300", "the response has 300 blocks, more than the limit of 256"),
    ("blocks_nested_50k", "the response has 50000 blocks, more than the limit of 256"),
    ("bytes_1m", "the response has 1000026 bytes (UTF-8), more than the limit of 1000000"),
    ("bytes_1m_of_4_byte_characters", "the response has 1000026 bytes (UTF-8), more than the limit of 1000000"),
]


@pytest.mark.parametrize("name, reason", OVER_A_LIMIT)
def test_a_record_over_a_limit_gets_its_reason(capsys, corpus, name, reason):
    code, out, err = _run(capsys, _argv("check", name, corpus) + ["--json"])
    record = json.loads(out.splitlines()[0])
    assert code == 1 and err == ""
    assert not record["valid"] and reason in record["reasons"][0] and record["L_total"] is None

    code, out, err = _run(capsys, _argv("score", name, corpus) + ["--json"])
    record = json.loads(out.splitlines()[0])
    assert code == 0 and err == ""
    assert reason in record["format_error"] and not record["format_valid"] and not record["accel_measured"]

    code, out, err = _run(capsys, _argv("view", name, corpus))
    assert code == 0 and err == ""
    assert reason in corpus["out"].read_text()


def test_a_thread_naming_a_huge_number_is_a_reference_not_a_crash(capsys, corpus):
    code, out, err = _run(capsys, _argv("check", "reference_digits", corpus) + ["--json"])
    assert code == 0 and json.loads(out.splitlines()[0])["valid"]


def test_sft_data_refuses_a_record_over_a_limit_before_replaying_it(corpus):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(corpus["tok"])
    ok = {"prompt": "p", "response_parallel": _think(_block(2, "b"))}
    huge = {"id": "huge", "prompt": "p", "response_parallel": _think(_block(10_000, "yyyy"))}
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"record 1 \(huge\): block 1: 10000 threads, more than the limit of 64"):
        build_tries([ok, huge], tokenizer, "parallel")
    assert time.perf_counter() - start <= 2 * SECONDS_PER_RECORD
    with pytest.raises(ValueError, match=r"record 0 \(no id\): 31 tokens, more than a training row's 9"):
        build_tries([{"prompt": "p", "response_parallel": "0123456789"}], tokenizer, "parallel", max_tokens=9)
    long_prompt = {"prompt": "p" * 1_000_001, "response_parallel": "x"}
    with pytest.raises(ValueError, match=r"the prompt has 1000001 bytes \(UTF-8\)"):
        build_tries([long_prompt], tokenizer, "parallel")


# --------------------------------------------------------------------------- big records, in a subprocess

_MEASURE = """
import json, resource, sys, time
import rollout.tiny, rewards.checker, cluster.viewer  # imported first: the clock counts the commands' own work
from cluster.cli import main
results = []
for argv in json.loads(sys.argv[2]):
    start = time.perf_counter()
    code = main(argv)
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    results.append({"argv": argv, "code": code, "seconds": time.perf_counter() - start, "peak_kb": peak})
with open(sys.argv[1], "w") as f:
    json.dump(results, f)
"""
#: Address-space cap of the measuring subprocess: a command that replays quadratically dies at it.
_ADDRESS_SPACE = 4 << 30


def _cap_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE, _ADDRESS_SPACE))


def test_big_records_take_bounded_time_and_memory(tmp_path, corpus):
    six_mb = tmp_path / "threads_100k.jsonl"
    six_mb.write_text(_line(_think(_block(100_000, "yyyy"))))
    valid = tmp_path / "valid_40x64.jsonl"
    valid.write_text(_line(_think(("sequential text\n" + _block(64, "w" * 70, "step")) * 40)))
    largest = tmp_path / "valid_999kB.jsonl"  # just under the size limit: about a million byte tokens
    largest.write_text(_line(_think("\u20ac" * 333_000)))
    assert six_mb.stat().st_size > 6_000_000 and valid.stat().st_size > 300_000
    tok, page = str(corpus["tok"]), str(tmp_path / "page.html")
    runs = [
        (["check", str(six_mb), "--tokenizer", tok, "--json"], 1),
        (["score", str(six_mb), "--tokenizer", tok, "--json"], 0),
        (["view", str(six_mb), "--out", page], 0),
        (["check", str(valid), "--tokenizer", tok, "--json"], 0),
        (["score", str(valid), "--tokenizer", tok, "--json"], 0),
        (["view", str(valid), "--out", page], 0),
        (["check", str(largest), "--tokenizer", tok, "--json"], 0),
        (["score", str(largest), "--tokenizer", tok, "--json"], 0),
    ]
    report = tmp_path / "measured.json"
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(report), json.dumps([argv for argv, _ in runs])],
                          cwd=REPO, capture_output=True, text=True, timeout=600, preexec_fn=_cap_address_space)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    measured = json.loads(report.read_text())
    for (argv, code), m in zip(runs, measured):
        print(f"{' '.join(argv[:1])} {Path(argv[1]).name}: exit {m['code']}, {m['seconds']:.2f} s, "
              f"peak {m['peak_kb'] / 1024:.0f} MiB")
        assert m["code"] == code, m
        assert m["seconds"] <= SECONDS_PER_RECORD, m
        assert m["peak_kb"] <= MAX_PEAK_KB, m
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"line"')]
    check_big, score_big, check_valid, score_valid, check_largest, score_largest = rows
    too_big = "the response has 5877862 bytes (UTF-8), more than the limit of 1000000"
    assert check_big["reasons"] == [too_big] and score_big["format_error"] == too_big
    assert check_valid["valid"] and check_valid["L_crit"] < check_valid["L_total"]
    assert score_valid["L_crit"] == check_valid["L_crit"] and score_valid["R_accel"] > 0
    assert check_largest["L_total"] == score_largest["L_total"] > 999_000


# --------------------------------------------------------------------------- viewer: markup in every field

PAYLOAD = ('"\'><script>document.title="pwned"</script><img class="injected" src=x '
           'onerror="document.title=\'pwned\'"><b class="injected">bold</b>')

_XSS_PROBE = """
<pre id="probe"></pre>
<script>
document.getElementById('probe').textContent = JSON.stringify({
  title: document.title, scripts: document.scripts.length,
  injected: document.querySelectorAll('.injected, img').length,
  shown: document.body.innerText.split('<b class="injected">bold</b>').length - 1});
</script>
"""


def _xss_records() -> list:
    """Records with PAYLOAD in every field the page shows."""
    block = (f"<Parallel>\n<Outlines>\n<Outline>1: {PAYLOAD}</Outline>\n</Outlines>\n"
             f"<Thread>\n1: {PAYLOAD}\n</Thread>\n</Parallel>\n")
    measures = {k: PAYLOAD for k in ("finish_reason", "finish_detail", "L_total", "L_crit", "eta", "speedup",
                                     "n_blocks", "latency_s", "n_requests")}
    scores = {k: PAYLOAD for k in ("reward", "R_correct", "R_accel", "format_penalty", "format_valid",
                                   "format_error", "extracted_answer", "extraction", "check_method", "timed_out")}
    unit = Unit([1, 2], [3], role=PAYLOAD, block=PAYLOAD, thread=PAYLOAD, n_inserted=PAYLOAD)
    full = {"prompt": PAYLOAD, "answer": PAYLOAD, "prompt_index": PAYLOAD, "sample_index": PAYLOAD,
            "mode": PAYLOAD, "step": PAYLOAD, "threads_per_block": [PAYLOAD], "correct": PAYLOAD,
            "response": f"<think>\n{PAYLOAD}\n{block}{PAYLOAD}\n</think>\n\\boxed{{{PAYLOAD}}}",
            "units": [unit], **measures, **scores}
    return [
        full,
        {"text": f"{PAYLOAD}</Thread>{PAYLOAD}", "answer": PAYLOAD},  # does not parse: raw text under the error
        {"text": f"<Parallel>\n<Outlines>\n<Outline>1: {PAYLOAD}", "answer": PAYLOAD},  # cut off: closers added
        {"text": _think(_block(65, PAYLOAD)), "answer": PAYLOAD},  # over a limit: raw text under the reasons
    ]


def test_every_field_is_escaped_in_the_html():
    page = render(_xss_records(), title=PAYLOAD)
    assert "<script" not in page and "<img" not in page and '<b class="injected"' not in page
    assert CSP_META in page


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
def test_markup_in_every_field_stays_text_in_chromium(tmp_path):
    records = _xss_records()
    page = render(records, title=PAYLOAD)
    shown = _shown(page, tmp_path, probe=_XSS_PROBE)
    assert shown["title"] == PAYLOAD  # the page title, as text; a script that ran would have set "pwned"
    assert shown["scripts"] == 1 and shown["injected"] == 0  # only the probe; no element from a record
    assert shown["shown"] >= 40  # the payload is on the page, as text, in every field


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
def test_the_page_policy_stops_scripts_that_get_in(tmp_path):
    page = render(_xss_records()[1:2])
    ran = "<script>document.body.setAttribute('data-ran', 'yes')</script></body>"
    assert 'data-ran="yes"' in chromium_dom(page.replace(CSP_META, "").replace("</body>", ran), tmp_path)
    assert 'data-ran="yes"' not in chromium_dom(page.replace("</body>", ran), tmp_path)
