"""The synthetic task's ``number_order="reversed"`` knob, used by the SFT experiments."""

import re

import pytest

from rollout.format import flatten, parse, validate
from rollout.task import TaskConfig, make_dataset, product_steps


def test_reversed_product_steps():
    assert product_steps(7, 406, 4, reverse=True) == "7*406: 7*6=2400, 7*400=0082, 2400+0082=2482"
    assert product_steps(7, 406, 4) == "7*406: 7*6=0042, 7*400=2800, 0042+2800=2842"


def test_reversed_responses_hold_and_keep_prompt_split_and_answer():
    cfg = TaskConfig(min_threads=2, max_threads=4, b_digits=2, number_order="reversed")
    data = make_dataset(cfg, {"train": 100, "validation": 20}, seed=3)
    normal = make_dataset(TaskConfig(min_threads=2, max_threads=4, b_digits=2), {"train": 100, "validation": 20},
                          seed=3)
    for split in data:
        assert [r["prompt"] for r in data[split]] == [r["prompt"] for r in normal[split]]
    for r in data["train"]:
        assert r["response_parallel"].endswith(f"\\boxed{{{r['answer']}}}")
        assert not validate(r["response_parallel"])
        assert flatten(parse(r["response_parallel"])) == r["response_sequential"]
        # products: "a*f=R" with R read backwards; sums: "X+Y=Z" with all three read backwards
        for a, f, res in re.findall(r"(\d+)\*(\d+)=(\d+)", r["response_parallel"]):
            assert int(a) * int(f) == int(res[::-1])
        sums = re.findall(r"(\d+)\+(\d+)=(\d+)", r["response_parallel"])
        assert sums
        for x, y, z in sums:
            assert len(x) == len(y) == len(z)
            assert int(x[::-1]) + int(y[::-1]) == int(z[::-1])
        last = sums[-1][2]
        assert int(last[::-1]) == int(r["answer"])


def test_number_order_is_checked():
    with pytest.raises(ValueError, match="number_order"):
        make_dataset(TaskConfig(number_order="backwards"), {"train": 1})
