"""The trajectory viewer: HTML content (fast) and what headless Chromium shows of it.

Trajectories are built by hand: units come from ``rollout.units.replay`` over
a byte tokenizer, so every thread's token count is its byte length (seed
excluded) and the critical thread of each block is known in advance.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cluster.viewer import CSP_META, critical_thread, missing_closers, read_jsonl, render, to_item
from rollout.units import replay

CHROMIUM = "/usr/bin/chromium"

# Block 1: thread 2 is the longest; block 2: thread 1 is. Thread 3 of block 1 carries markup that must stay text.
RESPONSE = (
    "<think>\nfirst & sequential <b>bold?</b>\n<Parallel>\n<Outlines>\n<Outline>1: short one</Outline>\n"
    "<Outline>2: the long one</Outline>\n<Outline>3: markup</Outline>\n</Outlines>\n"
    "<Thread>\n1: aa\n</Thread>\n<Thread>\n2: " + "b" * 50 + "\n</Thread>\n"
    "<Thread>\n3: <script>window.__pwned = 1</script>\n</Thread>\n</Parallel>\nmiddle text\n"
    "<Parallel>\n<Outlines>\n<Outline>1: left</Outline>\n<Outline>2: right</Outline>\n</Outlines>\n"
    "<Thread>\n1: cccccccccccccccccccccccc\n</Thread>\n<Thread>\n2: dd\n</Thread>\n</Parallel>\n"
    "done\n</think>\n\n\\boxed{42}"
)


def _tokens(body: str) -> int:
    """A thread's completion under the byte tokenizer: what follows its "N:" seed, then </Thread>."""
    return len(f" {body}\n</Thread>".encode())


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return list(text.encode())


# RESPONSE's units by hand (bytes): head 1 = "<think>\n" 8 + "first & sequential <b>bold?</b>\n" 32 +
# "<Parallel>\n" 11 + "<Outlines>\n" 11 + the outlines 32 + 35 + 29 + "</Outlines>" 11 = 169; block 1's threads
# 13, 61 and 46 (_tokens); head 2 = "</Parallel>\n" 12 + "middle text\n" 12 + 11 + 11 + outlines 27 + 28 +
# "</Outlines>" 11 = 112; block 2's threads 35 and 13; the tail "</Parallel>\ndone\n</think>\n\n\\boxed{42}" 37
# + EOS 1 = 38.  L_total = 169 + 13 + 61 + 46 + 112 + 35 + 13 + 38 = 487; L_crit = 169 + 61 + 112 + 35 + 38 = 415.
L_TOTAL, L_CRIT = 487, 415


def _record(response: str = RESPONSE, measures: bool = True, **extra) -> dict:
    units = replay([1, 2, 3], response, ByteTokenizer(), eos_token_id=0)
    rec = {"prompt": "Compute 6*7 <now>.", "answer": "42", "prompt_index": 3, "sample_index": 1,
           "response": response, "units": [u.to_dict() for u in units], "finish_reason": "eos", "latency_s": 0.25}
    if measures:
        rec.update(L_total=L_TOTAL, L_crit=L_CRIT, eta=1 - L_CRIT / L_TOTAL, n_blocks=2, threads_per_block=[3, 2])
    rec.update(extra)
    return rec


def test_measures_are_read_from_the_record_or_computed_from_its_units():
    assert [len(u["completion_ids"]) for u in _record()["units"]] == [169, 13, 61, 46, 112, 35, 13, 38]
    given = to_item(_record(L_total=500, L_crit=400))
    assert (given.measures["L_total"], given.measures["L_crit"]) == (500, 400)  # the record's own numbers
    computed = to_item(_record(measures=False))
    assert (computed.measures["L_total"], computed.measures["L_crit"]) == (L_TOTAL, L_CRIT)
    assert computed.measures["eta"] == pytest.approx(72 / 487, abs=1e-12)
    assert computed.measures["threads_per_block"] == [3, 2]
    assert 'data-key="L_crit">415<' in render([_record(measures=False)])


def _score(**kw) -> dict:
    out = {"reward": 1.2, "R_correct": 1.0, "R_accel": 0.2, "format_penalty": 0.0, "correct": True,
           "format_valid": True, "extracted_answer": "42"}
    out.update(kw)
    return out


def test_critical_thread_is_the_first_longest():
    assert critical_thread([3, 9, 9, 1]) == 1
    assert critical_thread([5]) == 0 and critical_thread([]) == -1


def test_page_marks_the_critical_thread_by_tokens_and_escapes_text():
    page = render([_record()], [_score()])
    crit = re.findall(r'<div class="thread critical" data-block="(\d)" data-thread="(\d)" data-length="(\d+)" '
                      r'data-unit="tokens"', page)
    assert crit == [("1", "2", str(_tokens("b" * 50))), ("2", "1", str(_tokens("c" * 24)))]
    assert "<script>" not in page and "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page
    assert "&lt;b&gt;bold?&lt;/b&gt;" in page and "first &amp; sequential" in page
    assert "Compute 6*7 &lt;now&gt;." in page
    assert 'data-key="R_accel">0.200<' in page and "reference 42" in page
    assert page.count('class="block"') == 2 and page.count("critical path</span>") == 2
    assert "sequential request:" in page and "3 units" not in page  # 3 seq + 5 thread units
    assert "8 units (engine requests)" in page


def test_records_without_units_compare_threads_by_characters():
    rec = {"text": RESPONSE, "mode": "parallel", "index": 0, "step": 5, **_score(correct=False)}
    page = render([rec])
    assert re.search(r'class="thread critical" data-block="1" data-thread="2" data-length="\d+" data-unit="chars"',
                     page)
    assert "incorrect" in page and "prompt 0 · parallel · step 5" in page
    assert "sequential request:" not in page


class _ExactChecker:
    def check(self, pred, gold):
        from rewards.checker import Verdict

        return Verdict(pred == gold, False, "same_text", 0.0)


def test_rl_heldout_records_carry_unit_token_counts_and_their_page_measures_threads_in_tokens(tmp_path):
    """The RL driver's evaluation records (``eval/step_N.jsonl``) hold each unit's token counts, not its ids:
    their page marks the same critical threads, by the same token counts, as a page of the full units."""
    from rewards.config import RewardConfig
    from rewards.score import score_many
    from rl.evaluation import evaluate_heldout
    from rollout.config import RolloutConfig
    from rollout.orchestrator import Trajectory
    from rollout.units import Unit

    rec = _record()
    traj = Trajectory(prompt_index=0, sample_index=0, prompt_ids=[1, 2, 3],
                      units=[Unit.from_dict(u) for u in rec["units"]], sequence_ids=[], text=RESPONSE,
                      finish_reason="eos", finish_detail="", L_total=L_TOTAL, L_crit=L_CRIT, eta=rec["eta"],
                      speedup=L_TOTAL / L_CRIT, n_blocks=2, threads_per_block=[3, 2], latency_s=0.1)

    class Rollouts:
        def generate(self, prompts, rc):
            return [traj]

    class Rewards:
        def score_batch(self, items):
            return score_many(items, RewardConfig(), _ExactChecker())

    _, path = evaluate_heldout(RolloutConfig(), ["parallel"], Rollouts(), Rewards(), [[1, 2, 3]], ["42"], 4,
                               tmp_path)
    (written,) = read_jsonl(path)
    assert "units" not in written  # counts only: no token ids
    assert [u["completion"] for u in written["unit_tokens"]] == [169, 13, 61, 46, 112, 35, 13, 38]
    seed = len("\n<Thread>\n2:".encode())  # the orchestrator's seed of thread 2, inserted after the prompt and head
    assert written["unit_tokens"][2] == {"role": "thread", "block": 1, "thread": 2, "context": 3 + 169 + seed,
                                         "completion": 61, "inserted": seed}
    page = render([written])
    full = render([rec])

    def threads(html_text):
        return re.findall(r'<div class="(thread(?: critical)?)" data-block="(\d)" data-thread="(\d)" '
                          r'data-length="(\d+)" data-unit="(\w+)"', html_text)

    assert threads(page) == threads(full) and {t[-1] for t in threads(page)} == {"tokens"}
    assert ("thread critical", "1", "2", str(_tokens("b" * 50)), "tokens") in threads(page)
    assert "sequential request: 169 tokens" in page and "8 units (engine requests)" in page
    assert not re.search(r"\d chars\b", page) and "data-unit=\"chars\"" not in page


def test_bad_unit_token_counts_are_an_error_naming_the_record_unit_and_field():
    good = {"role": "thread", "block": 1, "thread": 2, "context": 10, "completion": 4, "inserted": 3}
    rec = {"text": RESPONSE, "unit_tokens": [good]}
    assert to_item(rec).tokens[0].completion == 4
    for bad, message in [({**good, "completion": -1}, "unit 0: field 'completion' must be an integer >= 0"),
                         ({**good, "thread": None}, "unit 0: field 'thread' must be an integer"),
                         ({**good, "inserted": 11}, "'inserted' must be at most the context length"),
                         ({**good, "extra": 1}, "unknown field 'extra'"),
                         ({k: v for k, v in good.items() if k != "role"}, "missing field 'role'"),
                         ({**good, "role": "x"}, "field 'role' must be")]:
        with pytest.raises(ValueError, match=f"record 0: field 'unit_tokens': .*{re.escape(message)}"):
            to_item({**rec, "unit_tokens": [bad]})
    with pytest.raises(ValueError, match="expected a list"):
        to_item({**rec, "unit_tokens": "3"})


def test_a_cut_response_is_closed_for_display_and_a_broken_one_shown_raw():
    assert missing_closers("<Parallel><Outlines><Outline>1: x") == "</Outline></Outlines></Parallel>"
    assert missing_closers("a</Thread>") is None and missing_closers("plain") == ""
    cut = "<think>\n<Parallel>\n<Outlines>\n<Outline>1: x</Outline>\n</Outlines>\n<Thread>\n1: par"
    page = render([{"text": cut, "finish_reason": "budget"}])
    assert "ends inside a block (cut off); shown with &lt;/Thread&gt;&lt;/Parallel&gt; added" in page
    assert 'class="thread critical"' in page and 'data-key="finish_reason">budget<' in page
    page = render([{"text": "<think>\n</Thread> oops <Parallel>", "finish_reason": "eos"}])
    assert "does not parse into blocks" in page and "&lt;/Thread&gt; oops" in page


def test_bad_input_is_an_error_naming_the_record(tmp_path):
    with pytest.raises(ValueError, match="record 1: no string field 'response' or 'text'"):
        render([_record(), {"prompt": "x"}])
    with pytest.raises(ValueError, match="2 scores for 1 trajectories"):
        render([_record()], [None, None])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n[1]\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected a JSON object"):
        read_jsonl(bad)


def test_trajectory_objects_render(tmp_path):
    from rollout.orchestrator import Trajectory

    rec = _record()
    traj = Trajectory(prompt_index=0, sample_index=0, prompt_ids=[1, 2, 3],
                      units=[__import__("rollout.units", fromlist=["Unit"]).Unit.from_dict(u) for u in rec["units"]],
                      sequence_ids=[], text=RESPONSE, finish_reason="eos", finish_detail="", L_total=rec["L_total"],
                      L_crit=rec["L_crit"], eta=rec["eta"], speedup=1.0, n_blocks=2, threads_per_block=[3, 2],
                      latency_s=0.1)
    item = to_item(traj)
    assert item.measures["L_crit"] == rec["L_crit"] and item.units is not None
    assert "critical path" in render([traj])


def test_cli_writes_the_page(tmp_path):
    from cluster.cli import main

    src = tmp_path / "traj.jsonl"
    src.write_text(json.dumps(_record()) + "\n" + json.dumps(_record(sample_index=2)) + "\n")
    out = tmp_path / "page" / "view.html"
    assert main(["view", str(src), "--out", str(out), "--limit", "1"]) == 0
    assert out.read_text().count('<section class="trajectory"') == 1
    assert main(["view", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2


# --------------------------------------------------------------------------- headless Chromium

_PROBE = """
<pre id="probe"></pre>
<script>
(() => {
  const rect = el => el.getBoundingClientRect();
  const blocks = [...document.querySelectorAll('.block')].map(b => {
    const threads = [...b.querySelectorAll('.thread')];
    return {
      tops: threads.map(t => Math.round(rect(t).top)),
      lefts: threads.map(t => Math.round(rect(t).left)),
      rights: threads.map(t => Math.round(rect(t).right)),
      visible: threads.map(t => rect(t).width > 50 && rect(t).height > 10),
      outline_above: threads.map(t => rect(t.querySelector('.outline')).bottom
                                      <= rect(t.querySelector('.thread-body')).top + 1),
      critical: threads.map(t => t.classList.contains('critical')),
      border: threads.map(t => getComputedStyle(t).borderTopColor),
      texts: threads.map(t => t.innerText),
    };
  });
  const out = {sections: document.querySelectorAll('section.trajectory').length, blocks,
               text: document.body.innerText, scripts: document.scripts.length,
               pwned: window.__pwned === undefined ? null : window.__pwned};
  document.getElementById('probe').textContent = JSON.stringify(out);
})();
</script>
"""


def chromium_dom(page: str, tmp_path: Path) -> str:
    """The DOM headless Chromium holds for ``page`` after loading it (its scripts, if any, have run)."""
    path = tmp_path / "page_in_chromium.html"
    path.write_text(page)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,3000", "--dump-dom", path.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _shown(page: str, tmp_path: Path, probe: str = _PROBE) -> dict:
    """What Chromium lays out for ``page``: what ``probe`` writes into ``<pre id="probe">`` (see ``_PROBE``).

    The page's Content-Security-Policy is taken out so the probe can run: what
    is tested is the page's escaping alone.
    """
    assert CSP_META in page
    dom = chromium_dom(page.replace(CSP_META, "").replace("</body>", probe + "</body>"), tmp_path)
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m and m.group(1), "no probe output in Chromium's DOM"
    import html

    return json.loads(html.unescape(m.group(1)))


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
def test_chromium_shows_threads_side_by_side_with_the_critical_path_marked(tmp_path):
    seq_only = {"response": "<think>\nplain steps\n</think>\n\n\\boxed{7}", "finish_reason": "eos", "answer": "8",
                **_score(correct=False, reward=0.0, R_correct=0.0, R_accel=0.0, extracted_answer="7")}
    shown = _shown(render([_record(), seq_only], [_score(), None]), tmp_path)
    assert shown["sections"] == 2
    assert shown["scripts"] == 1 and shown["pwned"] is None  # only the probe ran; the thread's <script> is text
    b1, b2 = shown["blocks"]
    for block, k in ((b1, 3), (b2, 2)):
        assert len(block["tops"]) == k and all(block["visible"])
        assert len(set(block["tops"])) == 1  # one row
        assert all(r <= l for r, l in zip(block["rights"], block["lefts"][1:]))  # left to right, no overlap
        assert all(block["outline_above"])
    assert b1["critical"] == [False, True, False] and b2["critical"] == [True, False]
    assert b1["border"][1] == "rgb(192, 57, 43)" and b1["border"][0] != b1["border"][1]
    assert "critical path" in b1["texts"][1] and "critical path" not in b1["texts"][0]
    assert b1["texts"][0].startswith("1: short one") and "<script>window.__pwned = 1</script>" in b1["texts"][2]
    assert b1["texts"][1].splitlines()[-1] == f"thread 2: {_tokens('b' * 50)} tokens critical path"
    text = shown["text"]
    assert "block 1 · 3 threads · critical path: thread 2" in text
    assert "first & sequential <b>bold?</b>" in text and "Compute 6*7 <now>." in text
    assert "R_accel" in text and "0.200" in text and "incorrect" in text and "correct" in text
    assert "plain steps" in text and "2 trajectories" in text
