"""The synthetic task's layout knobs (number order, sum and outline styles, thread width, keys) and its ceiling."""

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


def test_chain_sums_and_tight_outlines():
    cfg = TaskConfig(min_threads=4, max_threads=4, blocks=2, b_digits=3, number_order="reversed",
                     sum_style="chain", outline_style="tight")
    data = make_dataset(cfg, {"train": 50}, seed=4)
    for r in data["train"]:
        text = r["response_parallel"]
        assert not validate(text)
        assert flatten(parse(text)) == r["response_sequential"]
        assert re.findall(r"<Outline>\d+:\d+\*\d+</Outline><Outline>", text)  # back to back, no space
        values = [a * b for g in r["terms"] for a, b in g]
        after = text.split("</Parallel>\n")[1:]  # the sums after each join
        for i, part in enumerate(after):
            lines = part.split("<")[0].strip().splitlines()
            assert len(lines) == (4 if i else 3)  # a block's first line also takes the total of the blocks before
            prev = None
            for j, line in enumerate(lines):
                left, term, new = re.fullmatch(r"(\d*)\+(\d+)=(\d+)", line).groups()
                assert bool(left) == (j == 0)  # only the first line after a join restates the total
                if j:
                    assert int(new[::-1]) == int(prev[::-1]) + int(term[::-1])
                prev = new
            assert int(prev[::-1]) == sum(values[: 4 * (i + 1)])
        assert int(prev[::-1]) == int(r["answer"])


def test_sum_outline_and_width_styles_are_checked():
    for knob in ("sum_style", "outline_style", "thread_width", "result_key", "sequential_keys"):
        with pytest.raises(ValueError, match=knob):
            make_dataset(TaskConfig(**{knob: "other"}), {"train": 1})


def test_ceiling_of_the_references():
    from rollout.task import ceiling
    from rollout.tiny import build_tokenizer

    tok = build_tokenizer()
    base = TaskConfig(min_threads=4, max_threads=4, b_digits=3, number_order="reversed")
    terse = TaskConfig(min_threads=4, max_threads=4, b_digits=3, number_order="reversed", sum_style="chain",
                       outline_style="tight")
    records = make_dataset(base, {"test": 40}, seed=1)["test"]
    c = ceiling(records, tok)
    seq_len = len(tok.encode(records[0]["response_sequential"])) + 1  # every byte one token, plus the end of sequence
    assert ceiling(records[:1], tok).L_sequential == seq_len
    assert c.L_crit_parallel < c.L_sequential < c.L_total_parallel
    assert c.speedup == pytest.approx(c.L_sequential / c.L_crit_parallel)
    # the terse layout writes the same threads with fewer tokens on the critical path
    assert ceiling(make_dataset(terse, {"test": 40}, seed=1)["test"], tok).speedup > c.speedup + 0.05
    with pytest.raises(ValueError):
        ceiling([], tok)


def test_thread_width_answer_pads_every_number_like_the_sums():
    cfg = TaskConfig(min_threads=3, max_threads=3, b_digits=4, number_order="reversed", sum_style="chain",
                     outline_style="tight", thread_width="answer")
    for r in make_dataset(cfg, {"train": 30}, seed=2)["train"]:
        widths = {len(n) for n in re.findall(r"=(\d+)", r["response_parallel"])}
        assert widths == {len(str(3 * 9 * 9999))}  # products, thread sums and the sums after the join alike
        for x, y, z in re.findall(r"(\d*)\+(\d+)=(\d+)", r["response_parallel"]):
            assert int(y[::-1]) + (int(x[::-1]) if x else 0) <= int(z[::-1])


def test_keyed_results_every_sum_term_follows_its_product_key():
    cfg = TaskConfig(min_threads=3, max_threads=4, blocks=2, b_digits=3, number_order="reversed",
                     sum_style="chain", outline_style="tight", thread_width="answer", result_key="hash")
    plain = TaskConfig(**{**cfg.__dict__, "result_key": "none"})
    data, old = make_dataset(cfg, {"train": 40}, seed=5), make_dataset(plain, {"train": 40}, seed=5)
    for r, o in zip(data["train"], old["train"]):
        assert r["prompt"] == o["prompt"] and r["answer"] == o["answer"]
        text = r["response_parallel"]
        assert not validate(text)
        assert flatten(parse(text)) == r["response_sequential"]
        # without keys the same text: drop every ' #k:' tail and every 'k#:' before a term
        assert re.sub(r"#\d+:", "", re.sub(r" #\d+:\d+\n", "\n", text)) == o["response_parallel"]
        for block, part in zip(r["terms"], text.split("<Parallel>")[1:]):
            threads, after = part.split("</Parallel>\n")
            products = re.findall(r"<Thread>\n(\d+): (\d+)\*(\d+): .*? #(\d+):(\d+)\n</Thread>", threads)
            assert [(int(a), int(b)) for _, a, b, _, _ in products] == [tuple(t) for t in block]
            keyed = {}
            for n, a, b, key, result in products:
                assert key == n and int(result[::-1]) == int(a) * int(b)  # the thread's number, its product
                keyed[key] = result
            sums = after.split("<")[0].strip().splitlines()
            terms = [t for line in sums for t in re.findall(r"#(\d+):(\d+)", line)]
            assert terms == sorted(keyed.items())  # every product added once, in order, copied after its key
        assert text.count("#1:") == 4  # a key is written in its thread and in one sum line, per block
        seq = r["response_sequential"].splitlines()
        assert re.fullmatch(r"\d+\*\d+: .* #1:\d+", seq[1])  # the sequential lines end the same way


def test_sequential_keys_give_each_sequential_line_its_key_and_a_plan_to_copy_from():
    from rl.sft_data import response_units
    from rollout.task import ceiling
    from rollout.tiny import build_tokenizer

    cfg = TaskConfig(min_threads=3, max_threads=4, blocks=2, b_digits=2, number_order="reversed",
                     sum_style="chain", outline_style="tight", thread_width="answer", result_key="hash")
    variants = {k: make_dataset(TaskConfig(**{**cfg.__dict__, "sequential_keys": k}), {"test": 30}, seed=4)["test"]
                for k in ("none", "prefix", "plan")}
    for none, prefix, plan in zip(*variants.values()):
        assert none["prompt"] == plan["prompt"] and none["answer"] == plan["answer"]
        assert none["response_parallel"] == prefix["response_parallel"] == plan["response_parallel"]
        assert flatten(parse(none["response_parallel"])) == none["response_sequential"]
        for r in (prefix, plan):
            assert not validate(r["response_sequential"])
            assert r["response_sequential"].endswith(f"\\boxed{{{r['answer']}}}")
        # prefix: the lines of 'none', each product line after its key 'k: ', k its number in the block
        lines = prefix["response_sequential"].splitlines()
        assert re.sub(r"(?m)^\d+: ", "", prefix["response_sequential"]) == none["response_sequential"]
        products = [re.fullmatch(r"(\d+): (\d+)\*(\d+): .* #(\d+):\d+", x) for x in lines]
        products = [m.groups() for m in products if m]
        assert [(int(a), int(b)) for _, a, b, _ in products] == [tuple(t) for g in plan["terms"] for t in g]
        assert all(k == key for k, _, _, key in products)
        assert [int(k) for k, _, _, _ in products] == [i for g in plan["terms"] for i in range(1, len(g) + 1)]
        # plan: the lines of 'prefix', and before each block's products one line listing them with their keys
        seq = plan["response_sequential"].splitlines()
        plans = [x for x in seq if re.fullmatch(r"\d+:\d+\*\d+( \d+:\d+\*\d+)*", x)]
        assert plans == [" ".join(f"{i}:{a}*{b}" for i, (a, b) in enumerate(g, start=1)) for g in plan["terms"]]
        assert seq[1] == plans[0]  # right after '<think>', as the outlines follow the prompt
        assert [x for x in seq if x not in plans] == lines
    # the sequential baseline trains on the task's sequential reference as written (data.response_field)
    tok = build_tokenizer()
    r = variants["plan"][0]
    unit, = response_units([1, 2], r["response_sequential"], tok, tok.eos_token_id, "sequential")
    assert unit.completion_ids[-1] == tok.eos_token_id
    assert tok.decode(unit.completion_ids[:-1]) == r["response_sequential"]
    # the sequential references get longer, the parallel ones do not: the ceiling rises with them
    c = {k: ceiling(v, tok) for k, v in variants.items()}
    assert c["none"].L_crit_parallel == c["plan"].L_crit_parallel
    assert c["none"].L_sequential < c["prefix"].L_sequential < c["plan"].L_sequential
    assert c["none"].speedup < c["prefix"].speedup < c["plan"].speedup


def test_task_data_folder_settings_are_checked_and_old_folders_read_with_defaults(tmp_path):
    import json

    from rl.sft_data import ensure_task_data

    sizes = {"train": 4, "validation": 2}
    cfg = TaskConfig(b_digits=2)
    ensure_task_data(tmp_path, cfg, sizes, 0)
    marker = json.loads((tmp_path / "task.json").read_text())
    # a folder from before these knobs
    for knob in ("sum_style", "outline_style", "thread_width", "result_key", "sequential_keys"):
        del marker[knob]
    (tmp_path / "task.json").write_text(json.dumps(marker))
    assert ensure_task_data(tmp_path, cfg, sizes, 0) == tmp_path
    with pytest.raises(ValueError, match=r"'sum_style': \('restate', 'chain'\)"):
        ensure_task_data(tmp_path, TaskConfig(b_digits=2, sum_style="chain"), sizes, 0)
