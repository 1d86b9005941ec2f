"""``threadweaver prepare-data``: MATH/GSM8K-style records (JSONL, JSON, Parquet, verl's layout) -> prompt/answer files.

Inputs are written here by hand in each dataset's own field layout (GSM8K:
``question`` / ``answer`` with ``#### N``; MATH: ``problem`` / ``solution``
with ``\\boxed{}``; MATH-500: a plain ``answer``; verl's ``RLHFDataset`` rows:
``prompt`` messages and ``reward_model.ground_truth``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.cli import main as cli_main
from cluster.evaluate import read_benchmark
from rl.prepare_data import PrepareDataConfig, answer_text, prepare_data
from rollout.task import TaskConfig, hash_split, split_of

GSM8K = [
    {"question": "Tom has 3 apples and buys 1,000 more. How many apples does he have?",
     "answer": "He has 3 + 1000 = <<3+1000=1003>>1003 apples.\n#### 1,003"},
    {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
]
MATH = [
    {"problem": "Solve $2x = 1$.", "solution": "Divide by 2: $x = \\boxed{\\frac{1}{2}}$.", "level": "Level 1",
     "type": "Algebra"},
    {"problem": "What is $\\sqrt{16}$?", "solution": "First $\\boxed{3}$ is wrong; it is $\\boxed{4}$.",
     "level": "Level 2", "type": "Prealgebra"},
]
VERL = [  # as verl's examples/data_preprocess/gsm8k.py writes them
    {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "What is 6 * 7?"}], "ability": "math",
     "reward_model": {"style": "rule", "ground_truth": "42"}, "extra_info": {"split": "train", "index": 0}},
    {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "What is 5 + 5?"}], "ability": "math",
     "reward_model": {"style": "rule", "ground_truth": "10"}, "extra_info": {"split": "train", "index": 1}},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_gsm8k_jsonl_to_one_split(tmp_path):
    src = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    result = prepare_data(PrepareDataConfig(src=str(src), out=str(tmp_path / "out"), split="test"))
    assert result.counts == {"test": 2} and result.formats == {"gsm8k": 2} and result.duplicates == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test.jsonl"]
    assert lines(tmp_path / "out" / "test.jsonl") == [
        {"id": "test-0", "prompt": GSM8K[0]["question"], "answer": "1003", "source_index": 1},
        {"id": "test-1", "prompt": GSM8K[1]["question"], "answer": "4", "source_index": 2},
    ]


def test_math_solutions_give_the_last_boxed_answer_and_kept_fields(tmp_path):
    src = tmp_path / "math.json"  # a .json list, as some dumps come
    src.write_text(json.dumps(MATH))
    prepare_data(PrepareDataConfig(src=str(src), out=str(tmp_path / "out"), split="train",
                                   keep_fields=["level", "type"]))
    got = lines(tmp_path / "out" / "train.jsonl")
    assert [(r["prompt"], r["answer"], r["level"], r["type"]) for r in got] == [
        (MATH[0]["problem"], "\\frac{1}{2}", "Level 1", "Algebra"),
        (MATH[1]["problem"], "4", "Level 2", "Prealgebra"),
    ]


def test_verl_parquet_rows(tmp_path):
    src = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(VERL), src)
    result = prepare_data(PrepareDataConfig(src=str(src), out=str(tmp_path / "out"), split="train",
                                            keep_fields=["data_source"]))
    assert result.formats == {"plain": 2}
    assert [(r["prompt"], r["answer"], r["data_source"]) for r in lines(tmp_path / "out" / "train.jsonl")] == [
        ("What is 6 * 7?", "42", "openai/gsm8k"), ("What is 5 + 5?", "10", "openai/gsm8k")]


def test_hash_split_is_the_task_split_and_the_files_are_read_downstream(tmp_path):
    records = [{"problem": f"What is {i} + {i}?", "answer": i * 2} for i in range(300)]
    records.append(dict(records[0]))  # a duplicate question
    src = write_jsonl(tmp_path / "all.jsonl", records)
    cfg = PrepareDataConfig(src=str(src), out=str(tmp_path / "out"), validation_share=0.1, test_share=0.2)
    result = prepare_data(cfg)
    assert result.duplicates == 1 and sum(result.counts.values()) == 300
    assert set(result.counts) == {"train", "validation", "test"}
    for split, path in result.paths.items():
        for rec in lines(path):
            assert hash_split(rec["prompt"], 0.1, 0.2) == split
            assert rec["answer"] == str(int(rec["prompt"].split()[2]) * 2)  # numbers become text
    # the same hash as the synthetic task's splits
    task = TaskConfig(validation_share=0.1, test_share=0.2)
    assert all(split_of(r["problem"], task) == hash_split(r["problem"], 0.1, 0.2) for r in records)
    problems = read_benchmark(result.paths["test"])  # what threadweaver eval reads
    assert len(problems) == result.counts["test"] and problems[0].answer == lines(result.paths["test"])[0]["answer"]


@pytest.mark.parametrize("value, fmt, expected", [
    ("#### 1,234,567", "auto", ("1234567", "gsm8k")),
    ("x \\boxed{a, b} y \\boxed{\\{1,2\\}}", "auto", ("\\{1,2\\}", "boxed")),
    (" 7 ", "auto", ("7", "plain")),
    (3.5, "auto", ("3.5", "plain")),
    ("a long\nworked solution", "plain", ("a long\nworked solution", "plain")),
])
def test_answer_text(value, fmt, expected):
    assert answer_text(value, fmt) == expected


@pytest.mark.parametrize("value, fmt, message", [
    ("We add them.\nThe total is 5.", "auto", "set answer_format=plain"),
    ("the total is 5", "gsm8k", "has no '####'"),
    ("\\boxed{5", "boxed", "no complete \\boxed{} (unclosed_boxed)"),
    ("#### ", "auto", "the answer is empty"),
    ([1, 2], "auto", "text or a number, got list"),
    (True, "auto", "text or a number, got bool"),
])
def test_answers_that_cannot_be_read(value, fmt, message):
    with pytest.raises(ValueError, match=None) as e:
        answer_text(value, fmt)
    assert message in str(e.value)


@pytest.mark.parametrize("records, extra, message", [
    ([{"problem": "Find x.", "level": "Level 1"}], [],
     "in.jsonl:1: no answer field: none of ['answer', 'solution'] is present (fields: level, problem)"),
    ([GSM8K[0], {"text": "Find x.", "answer": "1"}], [],
     "in.jsonl:2: no question field: none of ['problem', 'question', 'prompt'] holds text (fields: answer, text)"),
    ([{"prompt": [{"role": "user", "content": "Q"}], "reward_model": {"style": "rule"}}], [],
     "in.jsonl:1: no answer field 'reward_model.ground_truth'"),
    ([{"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
       "reward_model": {"ground_truth": "1"}}], [], "one user message with text content; this one has the roles"),
    ([{"problem": "Q", "answer": "1"}], ["layout=verl"], "layout=verl needs 'prompt' as a list"),
    (GSM8K, ["keep_fields=[level]"], "in.jsonl:1: no field 'level' of keep_fields"),
    (MATH, ["answer_fields=[solution]", "answer_format=gsm8k"], "in.jsonl:1: answer_format=gsm8k, but"),
    ([], [], "in.jsonl: no records"),
    (GSM8K, ["validation_share=0.5", "test_share=0.5"], "validation_share + test_share must be < 1"),
    (GSM8K, ["keep_fields=[answer]"], "keep_fields must not name ['answer']"),
    (GSM8K, ["bogus=1"], "bogus"),
    (GSM8K, ["EXTRA"], "3 positional arguments"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, records, extra, message):
    src = write_jsonl(tmp_path / "in.jsonl", records)
    assert cli_main(["prepare-data", str(src), str(tmp_path / "out"), *extra]) == 2
    captured = capsys.readouterr()
    assert message in captured.err, captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "out").exists()  # nothing written


def test_missing_or_unknown_files_and_existing_output(tmp_path, capsys):
    assert cli_main(["prepare-data", str(tmp_path / "no.jsonl"), str(tmp_path / "out")]) == 2
    assert f"data file {tmp_path / 'no.jsonl'} does not exist" in capsys.readouterr().err
    (tmp_path / "data.csv").write_text("a,b\n")
    assert cli_main(["prepare-data", str(tmp_path / "data.csv"), str(tmp_path / "out")]) == 2
    assert "expected a .jsonl, .json, .parquet file" in capsys.readouterr().err
    (tmp_path / "bad.parquet").write_text("not parquet")
    assert cli_main(["prepare-data", str(tmp_path / "bad.parquet"), str(tmp_path / "out")]) == 2
    assert "not a readable Parquet file" in capsys.readouterr().err

    src = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    assert cli_main(["prepare-data", str(src), str(tmp_path / "out"), "split=train"]) == 0
    printed = capsys.readouterr().out
    assert "train            2 records ->" in printed and "answers read as: gsm8k 2" in printed
    assert cli_main(["prepare-data", str(src), str(tmp_path / "out"), "split=train"]) == 2
    assert "train.jsonl exists; set overwrite=true" in capsys.readouterr().err
    assert cli_main(["prepare-data", f"src={src}", "out=" + str(tmp_path / "out"), "split=test"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test.jsonl", "train.jsonl"]
