"""The 'threadweaver score' command."""

import json

import pytest

from cluster.cli import main
from rollout.check import prompt_ids
from rollout.tiny import build_tokenizer
from rollout.units import encode, replay
from tests.test_rewards import PARALLEL, SEQUENTIAL


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four records; PARALLEL and SEQUENTIAL (tests/test_rewards.py) have hand-counted measures:
    PARALLEL L_total 53, L_crit 48, eta 5/53; SEQUENTIAL 20 tokens."""
    root = tmp_path_factory.mktemp("score")
    tok = build_tokenizer()
    tok.save_pretrained(root / "tok")
    units = replay(encode(tok, "Q: "), PARALLEL, tok, tok.eos_token_id)
    rows = [
        {"prompt": "What is 2*3?", "response": PARALLEL, "answer": "6"},
        {"prompt": "What is 2*3?", "response": SEQUENTIAL, "answer": 7},
        {"response": PARALLEL, "answer": "6", "units": [u.to_dict() for u in units]},
        {"response": "<think>\nroot\n</think>\n\\boxed{\\sqrt{8}}", "answer": "2\\sqrt{2}"},
    ]
    path = root / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, path


def run_json(capsys, *args) -> tuple[int, list[dict], dict]:
    code = main(["score", *map(str, args), "--json"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    return code, lines[:-1], lines[-1]["summary"]


def test_json_output_has_every_component(capsys, data):
    root, path = data
    code, rows, summary = run_json(capsys, path, "--tokenizer", root / "tok")
    assert code == 0 and [r["line"] for r in rows] == [1, 2, 3, 4]
    assert [r["correct"] for r in rows] == [True, False, True, True]
    for key in ("reward", "R_correct", "R_accel", "format_penalty", "timed_out", "format_valid",
                "L_total", "L_crit", "eta", "parallel", "extracted_answer"):
        assert all(key in r for r in rows)
    # the replayed record (prompt + tokenizer) and the one that carries its units measure the same by hand:
    # L_total 53, L_crit 48, eta 5/53, R_accel = min(0.5 * 5/53, 0.2) = 5/106; the sequential one 20 tokens
    for r in (rows[0], rows[2]):
        assert (r["L_total"], r["L_crit"]) == (53, 48)
        assert r["eta"] == pytest.approx(5 / 53, abs=1e-12) and r["R_accel"] == pytest.approx(5 / 106, abs=1e-12)
    assert (rows[1]["L_total"], rows[1]["L_crit"], rows[1]["eta"], rows[1]["reward"]) == (20, 20, 0.0, 0.0)
    assert rows[3]["check_method"] == "math_verify" and rows[3]["reward"] == 1.0  # no units: no bonus
    assert summary["records"] == 4 and summary["measured"] == 4
    assert summary["mean_correct"] == 0.75
    # (1 + 5/106) + 0 + (1 + 5/106) + 1 = 3 + 10/106, over 4 records
    assert summary["mean_reward"] == pytest.approx((3 + 10 / 106) / 4, abs=1e-12)


def test_records_without_units_have_no_measures(capsys, data):
    _, path = data
    code, rows, summary = run_json(capsys, path, "reward.preset=paper")
    assert code == 0 and rows[1]["reward"] == 0.0
    assert rows[0]["accel_measured"] is False and rows[0]["R_accel"] == 0.0 and rows[0]["eta"] is None
    # units given in the record: R_accel = 0.5 * min(5/53, 0.2) = 5/106
    assert rows[2]["R_accel"] == pytest.approx(5 / 106, abs=1e-12) and rows[2]["reward"] == pytest.approx(1 + 5 / 106)
    assert summary["measured"] == 1


def test_official_code_preset_counts_by_tag_and_needs_the_tokenizer(capsys, data):
    root, path = data
    code, rows, summary = run_json(capsys, path, "reward.preset=official-code", "--tokenizer", root / "tok")
    assert code == 0 and rows[1]["reward"] == -1.0                      # incorrect scores -1 in this preset
    assert rows[2]["R_accel"] == pytest.approx(0.5 * min(rows[2]["eta"], 0.2))
    units_count = run_json(capsys, path, "--tokenizer", root / "tok")[1][2]
    # by hand: L_total = 3 prompt ("Q: ") + 53 generated + 2 seeds x 5 ("\n<Thread>\nN:") + 1 join newline = 67;
    # L_crit = the units' path with prompt and inserted tokens (3 + 21 + (7 + 5) + (1 + 20) = 57) plus the shorter
    # thread's "\n", "<Thread>" and "</Thread>", which the published count puts in the block's sequential part = 60
    assert (units_count["L_total"], units_count["L_crit"]) == (53, 48)
    assert (rows[2]["L_total"], rows[2]["L_crit"]) == (67, 60) and rows[2]["eta"] == pytest.approx(7 / 67)
    # replayed over the chat-templated prompt: the same count, plus the longer prompt
    extra = len(prompt_ids(build_tokenizer(), "What is 2*3?")) - 3
    assert (rows[0]["L_total"], rows[0]["L_crit"]) == (67 + extra, 60 + extra)
    assert main(["score", str(path), "reward.preset=official-code"]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err


def test_table_output(capsys, data):
    root, path = data
    assert main(["score", str(path), "--tokenizer", str(root / "tok")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["line", "correct", "timed_out", "format_valid"]
    assert len(out) == 6 and out[-1].split()[0] == "mean"
    assert "(math_verify)" in out[4] and "(number)" in out[1]


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("not json\n", "not valid JSON"),
    ('{"answer": "1"}\n', "no string field 'response'"),
    ('{"response": "x"}\n', "field 'answer'"),
    ('{"response": "x", "answer": "1", "units": [{"nope": 1}]}\n', "'units'"),
    ("\n", "no records"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["score", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_the_reward_is_configured_like_rl_and_the_old_flags_still_work(capsys, data):
    root, path = data
    assert main(["score", "--show-config"]) == 0
    keys = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    assert {"reward.preset", "reward.rho", "reward.checker_timeout_s"} <= set(keys)
    assert main(["score", str(path), "reward.rho=0.3", "reward.clip=0.05", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "rho: 0.3" in printed and "clip: 0.05" in printed
    new = run_json(capsys, path, "reward.preset=paper", "reward.answer_region=whole")[1]
    code = main(["score", str(path), "--json", "--preset", "paper", "--whole-response"])
    captured = capsys.readouterr()
    old = [json.loads(x) for x in captured.out.splitlines()][:-1]
    timing = {"check_seconds", "check_cached"}
    assert code == 0 and [{k: v for k, v in r.items() if k not in timing} for r in old] == \
        [{k: v for k, v in r.items() if k not in timing} for r in new]
    assert captured.err.count("deprecated flag") == 2 and "reward.preset=..." in captured.err
    assert main(["score", str(path), "reward.rhoo=1"]) == 2
    assert "did you mean 'reward.rho'" in capsys.readouterr().err
    assert main(["score"]) == 2 and "name the JSONL file" in capsys.readouterr().err
