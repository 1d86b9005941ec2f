"""The verl reward function (rewards.verl_reward) gives `threadweaver score`'s reward for the same records.

Checked directly, through verl's own loader of custom reward functions, and through verl's
NaiveRewardManager on a one-row batch shaped like the agent loop's last row.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from cluster.cli import main
from rewards.tag_count import TagTokens
from rewards.verl_reward import compute_score
from rollout.task import TaskConfig, make_dataset
from rollout.tiny import build_tokenizer
from rollout.units import chat_prompt_ids, replay

PRESETS = ("paper", "official-code")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Six trajectories (three problems, parallel and sequential) with units, and the same records for
    `threadweaver score`: problem 1 answered wrong, problem 2's parallel answer cut by the budget."""
    root = tmp_path_factory.mktemp("verl_reward")
    tok = build_tokenizer()
    tok.save_pretrained(root / "tok")
    data = make_dataset(TaskConfig(min_threads=2, max_threads=4), {"train": 3}, seed=7)["train"]
    rows = []
    for i, rec in enumerate(data):
        prompt_ids = chat_prompt_ids(tok, rec["prompt"])
        for kind in ("parallel", "sequential"):
            response = rec[f"response_{kind}"]
            answer = rec["answer"] if i != 1 else str(int(rec["answer"]) + 1)  # record 1 is answered wrong
            units = replay(prompt_ids, response, tok, tok.eos_token_id)
            rows.append({"prompt": rec["prompt"], "response": response, "answer": answer,
                         "units": [u.to_dict() for u in units],
                         # record 2's parallel answer was cut by the budget: not rewarded (reward_cut_responses)
                         "finish_reason": "budget" if (i, kind) == (2, "parallel") else "eos"})
    path = root / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, tok, rows, path


def score_cli(capsys, path, *args) -> list[dict]:
    assert main(["score", str(path), "--json", *map(str, args)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()][:-1]


def trajectory_info(tok, row) -> dict:
    """extra_info as the threadweaver agent loop hands it to the reward (rl.verl.agent_loop)."""
    return {"index": 0, "threadweaver": {"text": row["response"], "units": row["units"],
                                         "finish_reason": row["finish_reason"],
                                         "tags": TagTokens.from_tokenizer(tok).to_dict()}}


def solution_str(tok, row) -> str:
    """What verl's reward manager decodes from the last row: special tokens (the tags) stripped."""
    last = row["units"][-1]
    return tok.decode(last["completion_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_same_reward_as_threadweaver_score(capsys, records, preset):
    root, tok, rows, path = records
    expected = score_cli(capsys, path, f"reward.preset={preset}", "--tokenizer", root / "tok")
    for row, want in zip(rows, expected):
        got = compute_score("threadweaver/tiny", solution_str(tok, row), row["answer"], trajectory_info(tok, row),
                            preset=preset)
        assert got["score"] == pytest.approx(want["reward"])
        for key in ("R_correct", "R_accel", "L_total", "L_crit", "eta", "correct", "format_valid"):
            assert got[key] == pytest.approx(float(want[key])), key
        assert got["acc"] == float(want["correct"]) and got["accel_measured"] == 1.0
    assert [r["correct"] for r in expected] == [True, True, False, False, False, True]  # wrong answer; cut
    assert any(r["R_accel"] > 0 for r in expected)


def test_without_the_trajectory_the_text_is_replayed_with_the_tokenizer(capsys, records, tmp_path):
    root, tok, rows, _ = records
    text_only = tmp_path / "text.jsonl"
    text_only.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "response", "answer")}) + "\n"
                                 for r in rows))
    expected = score_cli(capsys, text_only, "reward.preset=official-code", "--tokenizer", root / "tok")
    for row, want in zip(rows, expected):
        got = compute_score("d", row["response"], row["answer"], {"prompt": row["prompt"]},
                            preset="official-code", tokenizer=str(root / "tok"))
        assert (got["score"], got["L_crit"]) == (pytest.approx(want["reward"]), want["L_crit"])
    bare = compute_score("d", rows[0]["response"], rows[0]["answer"], {})
    assert bare["accel_measured"] == 0.0 and bare["R_accel"] == 0.0 and bare["score"] == 1.0
    with pytest.raises(ValueError, match="tokenizer"):
        compute_score("d", rows[0]["response"], rows[0]["answer"], {}, preset="official-code")
    with pytest.raises(TypeError, match="rhoo"):
        compute_score("d", rows[0]["response"], rows[0]["answer"], {}, rhoo=1.0)


def test_verl_loads_and_calls_the_function(records):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    _, tok, rows, _ = records
    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://rewards.verl_reward", "name": "compute_score", "reward_kwargs": {"preset": "official-code"}}}})
    fn = get_custom_reward_fn(config)
    row = rows[0]
    got = fn(data_source="threadweaver/tiny", solution_str=solution_str(tok, row), ground_truth=row["answer"],
             extra_info=trajectory_info(tok, row))
    direct = compute_score("threadweaver/tiny", solution_str(tok, row), row["answer"], trajectory_info(tok, row),
                           preset="official-code")
    got.pop("check_seconds"), direct.pop("check_seconds")
    assert got == direct
    assert got["score"] == pytest.approx(1.0 + got["R_accel"] if got["correct"] else -1.0)


def test_verls_naive_reward_manager_scores_the_last_row(records):
    """The batch verl's agent loop worker builds for the reward: the last unit as a row, the trajectory in
    tool_extra_fields; verl's manager decodes the row and calls our function."""
    import numpy as np
    import torch
    from tensordict import TensorDict
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

    _, tok, rows, _ = records
    row = rows[0]
    last = row["units"][-1]
    prompts, responses = torch.tensor([last["context_ids"]]), torch.tensor([last["completion_ids"]])
    data = DataProto(
        batch=TensorDict({"prompts": prompts, "responses": responses,
                          "attention_mask": torch.ones(1, prompts.shape[1] + responses.shape[1], dtype=torch.long)},
                         batch_size=1),
        non_tensor_batch={"data_source": np.array(["threadweaver/tiny"], dtype=object),
                          "reward_model": np.array([{"ground_truth": row["answer"]}], dtype=object),
                          "extra_info": np.array([{"index": 0}], dtype=object),
                          "tool_extra_fields": np.array([trajectory_info(tok, row)], dtype=object)})

    async def run():
        manager = NaiveRewardManager(None, tok, compute_score)
        return await manager.run_single(data)

    result = asyncio.run(run())
    direct = compute_score("threadweaver/tiny", solution_str(tok, row), row["answer"], trajectory_info(tok, row))
    assert result["reward_score"] == direct["score"] and result["reward_extra_info"]["L_crit"] == direct["L_crit"]
    assert result["reward_extra_info"]["accel_measured"] == 1.0 and direct["L_crit"] > len(last["completion_ids"])
