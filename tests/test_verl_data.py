"""verl's data layout: ``threadweaver export-verl`` writes it, verl's RLHFDataset and this project's readers read it.

Also: a missing verl gives one clear line in the command that needs it, and no other command imports verl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import COMMANDS, main
from rl.driver import RLConfig, RLDataConfig, load_data
from rl.sft import DataConfig, prepare_data
from rl.sft_data import build_tries
from rollout.records import from_verl_row, read_records, to_verl_row
from rollout.task import TaskConfig, make_dataset, write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("verl_data")
    records = make_dataset(TaskConfig(min_threads=2, max_threads=3), {"train": 12, "validation": 4, "test": 4}, seed=1)
    write_dataset(records, root / "jsonl")
    (root / "parquet").mkdir()
    for split in ("train", "validation", "test"):
        assert main(["export-verl", f"input={root / 'jsonl' / f'{split}.jsonl'}",
                     f"out={root / 'parquet' / f'{split}.parquet'}"]) == 0
    return root, records


def test_export_writes_verls_column_types(data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, records = data
    table = pq.read_table(root / "parquet" / "train.parquet")
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    assert table.schema.field("data_source").type == pa.string()
    assert table.schema.field("prompt").type.equals(messages, check_metadata=False)
    assert table.schema.field("ability").type == pa.string()
    assert table.schema.field("reward_model").type == pa.struct([("style", pa.string()),
                                                                 ("ground_truth", pa.string())])
    assert table.schema.field("extra_info").type.field("index").type == pa.int64()
    assert table.schema.field("agent_name").type == pa.string()
    rows = table.to_pylist()
    assert [r["extra_info"]["index"] for r in rows] == list(range(len(records["train"])))
    first, rec = rows[0], records["train"][0]
    assert first["prompt"] == [{"role": "user", "content": rec["prompt"]}]
    assert first["reward_model"] == {"style": "rule", "ground_truth": str(rec["answer"])}
    assert first["agent_name"] == "threadweaver" and first["data_source"] == "threadweaver/tiny"
    assert first["extra_info"]["response_parallel"] == rec["response_parallel"]


def test_verls_rlhf_dataset_reads_the_export(data, tmp_path):
    root, records = data
    out = tmp_path / "v.parquet"
    tok_dir = tmp_path / "tok"
    from rollout.tiny import build_tokenizer

    build_tokenizer().save_pretrained(tok_dir)
    # verify=true: RLHFDataset(out) row by row against what was written (raw_prompt, ground truth, index, agent)
    assert main(["export-verl", f"input={root / 'jsonl' / 'validation.jsonl'}", f"out={out}", "verify=true",
                 f"tokenizer={tok_dir}"]) == 0
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    dataset = RLHFDataset(str(out), build_tokenizer(), OmegaConf.create({"max_prompt_length": 512}))
    assert len(dataset) == len(records["validation"])
    row = dataset[2]
    assert row["raw_prompt"] == [{"role": "user", "content": records["validation"][2]["prompt"]}]
    assert (row["index"], row["agent_name"], row["data_source"]) == (2, "threadweaver", "threadweaver/tiny")


def test_this_projects_readers_take_verls_layout(data):
    root, records = data
    back = read_records(root / "parquet" / "train.parquet")
    fields = ("prompt", "answer", "response_parallel", "response_sequential", "id")
    assert [{k: r[k] for k in fields} for r in back] == [{k: str(r[k]) if k == "answer" else r[k] for k in fields}
                                                        for r in records["train"]]
    # SFT: the same tries from either file
    from rollout.tiny import build_tokenizer

    tok = build_tokenizer()
    sft = DataConfig(dir=str(root / "parquet"), train_file="train.parquet", validation_file="validation.parquet")
    train, val = prepare_data(sft)
    assert [t.input_ids for t in build_tries(train, tok, "parallel")] == \
           [t.input_ids for t in build_tries(records["train"], tok, "parallel")]
    # RL: prompts and answers
    from rollout.config import RolloutConfig

    rl = RLConfig(rollout=RolloutConfig(n=2), data=RLDataConfig(dir=str(root / "parquet"), train_file="train.parquet",
                                                                validation_file="test.parquet"))
    rl_train, rl_val = load_data(rl)
    assert [(r["prompt"], r["answer"]) for r in rl_val] == [(r["prompt"], str(r["answer"])) for r in records["test"]]
    # eval: problems
    from cluster.evaluate import read_benchmark

    problems = read_benchmark(root / "parquet" / "test.parquet")
    assert [(p.problem, p.answer) for p in problems] == [(r["prompt"], str(r["answer"])) for r in records["test"]]


def test_layout_conversion_errors_name_the_problem():
    with pytest.raises(ValueError, match="roles \\['system', 'user'\\]"):
        from_verl_row({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]})
    with pytest.raises(ValueError, match="'answer'"):
        to_verl_row({"prompt": "q"}, 0, data_source="d", ability="a", agent_name=None)
    row = to_verl_row({"prompt": "q", "answer": 3}, 5, data_source="d", ability="a", agent_name=None)
    assert "agent_name" not in row and row["extra_info"] == {"index": 5} and row["reward_model"]["ground_truth"] == "3"
    assert from_verl_row(row) == {"data_source": "d", "ability": "a", "prompt": "q", "answer": "3", "index": 5,
                                  "extra_info": {"index": 5}}


def test_bad_export_input_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": 1}) + "\n")
    assert main(["export-verl", f"input={bad}", f"out={tmp_path / 'o.parquet'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:1: no string field 'prompt'" in err[0]
    assert main(["export-verl", f"input={bad}", f"out={tmp_path / 'o.csv'}"]) == 2
    assert main(["export-verl", "inptu=x"]) == 2
    assert "did you mean 'input'" in capsys.readouterr().err
    assert main(["export-verl", "--show-config"]) == 0 and "agent_name" in capsys.readouterr().out


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


def test_a_missing_verl_is_one_clear_line(data, tmp_path):
    root, _ = data
    code = ("import sys; sys.modules['verl'] = None\n"  # what `import verl` failing looks like
            "from cluster.cli import main\n"
            f"sys.exit(main(['export-verl', 'input={root / 'jsonl' / 'test.jsonl'}', 'out={tmp_path / 'o.parquet'}',"
            f" 'verify=true', 'tokenizer={tmp_path}']))")
    proc = _python(code)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(err) == 1 and "cannot import verl.utils.dataset.rl_dataset" in err[0] and "scripts/setup.sh" in err[0]


def test_no_command_imports_verl():
    modules = sorted({module for module, _ in COMMANDS.values()})
    proc = _python("import importlib, sys\n"
                   f"for m in {modules!r}: importlib.import_module(m)\n"
                   "import rewards.verl_reward, rl.verl\n"
                   "print(sorted(m for m in sys.modules if m == 'verl' or m.startswith('verl.')))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
