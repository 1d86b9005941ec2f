"""The 'threadweaver score' command."""

import json

import pytest

from cluster.cli import main
from rollout.task import TaskConfig, make_dataset
from rollout.tiny import build_tokenizer
from rollout.units import chat_prompt_ids, replay


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    tok = build_tokenizer()
    tok.save_pretrained(root / "tok")
    rec = make_dataset(TaskConfig(min_threads=3, max_threads=3), {"train": 1}, seed=5)["train"][0]
    units = replay(chat_prompt_ids(tok, rec["prompt"]), rec["response_parallel"], tok, tok.eos_token_id)
    rows = [
        {"prompt": rec["prompt"], "response": rec["response_parallel"], "answer": rec["answer"]},
        {"prompt": rec["prompt"], "response": rec["response_sequential"], "answer": int(rec["answer"]) + 1},
        {"response": rec["response_parallel"], "answer": rec["answer"], "units": [u.to_dict() for u in units]},
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
    replayed, given = rows[0], rows[2]
    for key in ("L_total", "L_crit", "eta"):
        assert replayed[key] == given[key]
    assert replayed["eta"] > 0 and replayed["R_accel"] == pytest.approx(min(0.5 * replayed["eta"], 0.2))
    assert rows[3]["check_method"] == "math_verify"
    assert summary["records"] == 4 and summary["measured"] == 4
    assert summary["mean_correct"] == 0.75
    assert summary["mean_reward"] == pytest.approx(sum(r["reward"] for r in rows) / 4)


def test_preset_and_records_without_units(capsys, data):
    _, path = data
    code, rows, summary = run_json(capsys, path, "--preset", "official-code")
    assert code == 0 and rows[1]["reward"] == -1.0                      # incorrect scores -1 in this preset
    assert rows[0]["accel_measured"] is False and rows[0]["R_accel"] == 0.0 and rows[0]["eta"] is None
    assert rows[2]["R_accel"] == pytest.approx(0.5 * min(rows[2]["eta"], 0.2))  # units given in the record
    assert summary["measured"] == 1


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
