"""The synthetic task generator and the `make-data` / `check` commands."""

import json
import re

import pytest

from cluster.cli import main
from rollout.task import TaskConfig, make_dataset, product_steps
from rollout.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(path)
    return str(path)


def test_answers_are_exact_and_steps_correct():
    data = make_dataset(TaskConfig(min_threads=2, max_threads=5, blocks=2, a_digits=2, b_digits=3),
                        {"train": 200}, seed=1)
    for r in data["train"]:
        terms = [t for g in r["terms"] for t in g]
        assert int(r["answer"]) == sum(a * b for a, b in terms)
        assert r["response_parallel"].endswith(f"\\boxed{{{r['answer']}}}")
        assert r["response_sequential"].endswith(f"\\boxed{{{r['answer']}}}")
        # every equation written in a response holds
        for text in (r["response_parallel"], r["response_sequential"]):
            for lhs_a, op, lhs_b, rhs in re.findall(r"(\d+)([*+])(\d+)=(\d+)", text):
                a, b = int(lhs_a), int(lhs_b)
                assert (a * b if op == "*" else a + b) == int(rhs), (lhs_a, op, lhs_b, rhs)


def test_outlines_name_the_work_without_the_result():
    data = make_dataset(TaskConfig(), {"train": 50}, seed=2)
    for r in data["train"]:
        outlines = re.findall(r"<Outline>(.*?)</Outline>", r["response_parallel"])
        products = [a * b for g in r["terms"] for a, b in g]
        assert len(outlines) == len(products)
        for text, product in zip(outlines, products):
            assert str(product) not in text


def test_product_steps_layout():
    assert product_steps(7, 406, 4) == "7*406: 7*6=0042, 7*400=2800, 0042+2800=2842"


def test_splits_disjoint_deterministic_and_sized():
    sizes = {"train": 300, "validation": 40, "test": 40}
    a = make_dataset(TaskConfig(), sizes, seed=5)
    b = make_dataset(TaskConfig(), sizes, seed=5)
    c = make_dataset(TaskConfig(), sizes, seed=6)
    assert a == b and a != c
    prompts = {s: {r["prompt"] for r in a[s]} for s in a}
    assert {s: len(p) for s, p in prompts.items()} == sizes
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    # a different seed never puts a test problem into train
    assert not {r["prompt"] for r in c["train"]} & prompts["test"]


def test_too_small_problem_space_is_a_clear_error():
    with pytest.raises(ValueError, match="problem space too small"):
        make_dataset(TaskConfig(min_threads=1, max_threads=1, a_digits=1, b_digits=1), {"train": 500})


def test_make_data_cli(tmp_path, capsys):
    assert main(["make-data", str(tmp_path), "--train", "20", "--validation", "5", "--test", "5",
                 "--max-threads", "3"]) == 0
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == 20
    rec = json.loads(lines[0])
    assert {"prompt", "answer", "response_parallel", "response_sequential"} <= rec.keys()
    assert json.loads((tmp_path / "task.json").read_text())["max_threads"] == 3
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("ceiling: ") and last.endswith("5 problems of the test split)")


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_check_cli_valid_and_invalid(tmp_path, tokenizer_dir, capsys):
    data = make_dataset(TaskConfig(), {"train": 3}, seed=0)["train"]
    good = _write(tmp_path / "good.jsonl", data)
    assert main(["check", good, "--tokenizer", tokenizer_dir, "--field", "response_parallel"]) == 0
    out = capsys.readouterr().out
    assert "summary: 3/3 valid" in out

    broken = dict(data[0], response_parallel=data[0]["response_parallel"].replace("</Outlines>", "", 1))
    bad = _write(tmp_path / "bad.jsonl", [data[1], broken])
    assert main(["check", bad, "--tokenizer", tokenizer_dir, "--field", "response_parallel", "--json"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["valid"] and rows[0]["eta"] > 0 and rows[0]["L_crit"] < rows[0]["L_total"]
    assert not rows[1]["valid"] and "</Outlines>" in rows[1]["reasons"][0]
    assert rows[2]["summary"]["invalid"] == 1

    seq = _write(tmp_path / "seq.jsonl", data)
    assert main(["check", seq, "--tokenizer", tokenizer_dir, "--field", "response_sequential", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(r["eta"] == 0.0 for r in rows[:-1])

    # a hand-counted response (tests/test_rewards.py): L_total 53, L_crit 48, eta 5/53
    from tests.test_rewards import PARALLEL

    hand = _write(tmp_path / "hand.jsonl", [{"prompt": "What is 2*3?", "response": PARALLEL}])
    assert main(["check", hand, "--tokenizer", tokenizer_dir, "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (row["valid"], row["L_total"], row["L_crit"]) == (True, 53, 48)
    assert row["eta"] == pytest.approx(5 / 53, abs=1e-12)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("{not json\n", "not valid JSON"),
    ('{"prompt": "x"}\n', "no string field 'response'"),
    ("[1, 2]\n", "expected a JSON object"),
    ("", "no records"),
])
def test_check_cli_bad_input(tmp_path, tokenizer_dir, capsys, content, message):
    path = tmp_path / "in.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["check", str(path), "--tokenizer", tokenizer_dir]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unknown_command_suggests(capsys):
    assert main(["chek"]) == 2
    assert "did you mean 'check'" in capsys.readouterr().err
