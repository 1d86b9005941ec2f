"""Stage 2 (self-training): selection rules and outputs with a scripted engine that plays known
responses through the real orchestrator, and, as an integration test, the untrained tiny model on
the shared vLLM engine (everything dropped, every drop counted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from rewards.checker import AnswerChecker
from rollout.config import RolloutConfig
from rl.datagen.stage2 import Stage2Config, run_stage2, summary
from rollout.engine import LENGTH, STOP, Completion
from rollout.orchestrator import generate
from rollout.task import TaskConfig, make_dataset
from rollout.tiny import build_tokenizer
from rollout.units import chat_prompt_ids, replay


class PlayEngine:
    """A fake engine that plays one fixed response per prompt, request by request.

    The units the orchestrator would produce for each response are rebuilt with
    ``rollout.units.replay``; a request is answered with the completion of the
    unit whose context equals its prompt, cut after a stop token or at
    ``max_tokens`` as vLLM does.
    """

    max_model_len = 100_000

    def __init__(self, tokenizer, plays: list[tuple[list[int], str]]):
        self.table: dict[tuple[int, ...], list[int]] = {}
        for prompt_ids, text in plays:
            for u in replay(prompt_ids, text, tokenizer, tokenizer.eos_token_id):
                self.table[tuple(u.context_ids)] = list(u.completion_ids)
        self.done: list = []

    def submit(self, requests):
        for r in requests:
            ids = self.table[tuple(r.prompt_ids)]
            cut = next((i + 1 for i, t in enumerate(ids) if t in r.stop_token_ids), len(ids))
            ids, finish = (ids[:cut], STOP) if cut <= r.max_tokens else (ids[:r.max_tokens], LENGTH)
            self.done.append((r, Completion(ids, [-1.0] * len(ids), finish)))

    def wait(self):
        done, self.done = self.done, []
        return done

    def abort(self):
        self.done = []


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(eager=False) as c:
        yield c


def write_prompts(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_selection_keeps_valid_correct_parallel_trajectories(tmp_path, tok_dir, checker, capsys):
    tok = build_tokenizer()
    recs = make_dataset(TaskConfig(), {"train": 7}, seed=2)["train"]
    par = [r["response_parallel"] for r in recs]
    plays = [
        par[0],                                                           # kept, then its duplicate
        par[1].replace(f"\\boxed{{{recs[1]['answer']}}}", "\\boxed{1}"),   # incorrect
        recs[2]["response_sequential"],                                   # eta 0 < min_eta
        par[3].replace("</think>", ""),                                   # format: <think> never closed
        par[4].replace("\\boxed", "answer "),                             # no \boxed{} answer
        "<think>\n" + "1+1=2\n" * 400 + "</think>\n\n\\boxed{2}",         # over the token budget
        par[6],                                                           # kept, then its duplicate
    ]
    prompt_ids = [chat_prompt_ids(tok, r["prompt"]) for r in recs]
    engine = PlayEngine(tok, list(zip(prompt_ids, plays)))
    cfg = Stage2Config(model="scripted-model", prompts=str(tmp_path / "p.jsonl"), out=str(tmp_path / "s2.jsonl"),
                       rollout=RolloutConfig(n=2, max_tokens=1500, max_context=4096, seed=7), min_eta=0.05,
                       progress=False)
    write_prompts(Path(cfg.prompts), [{k: v for k, v in r.items() if k != "response_parallel"} for r in recs])
    result = run_stage2(cfg, lambda ids: generate(engine, tok, ids, cfg.rollout), tok, checker)

    reasons = [(d.trajectory.prompt_index, d.reason) for d in result.decisions]
    assert reasons == [(0, None), (0, "duplicate"), (1, "incorrect"), (1, "incorrect"), (2, "low_eta"),
                       (2, "low_eta"), (3, "format"), (3, "format"), (4, "no_answer"), (4, "no_answer"),
                       (5, "finish_budget"), (5, "finish_budget"), (6, None), (6, "duplicate")]
    stats = result.stats
    assert (stats["total"], stats["kept"], stats["prompts"]) == (14, 2, 7)
    assert stats["dropped"] == {"duplicate": 2, "incorrect": 2, "low_eta": 2, "format": 2, "no_answer": 2,
                                "finish_budget": 2}
    assert stats["kept_parallel"] == 2 and stats["kept_mean_eta"] > 0.05
    print(summary(stats))
    assert "kept 2 of 14 trajectories" in capsys.readouterr().out

    kept = [json.loads(x) for x in Path(cfg.out).read_text().splitlines()]
    assert [k["response"] for k in kept] == [par[0], par[6]]
    assert [k["id"] for k in kept] == [f"{recs[0]['id']}-s0", f"{recs[6]['id']}-s0"]
    for k, i in zip(kept, (0, 6)):
        assert k["prompt"] == recs[i]["prompt"] and k["answer"] == recs[i]["answer"]
        assert "response_sequential" not in k and "response_parallel" not in k
        assert k["provenance"]["model"] == "scripted-model" and k["provenance"]["seed"] == 7
        assert k["provenance"]["config_sha"] == stats["config_sha"] and k["eta"] > 0.05
    rejected = [json.loads(x) for x in (tmp_path / "s2.rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 12 and all(r["reason"] and "text" in r for r in rejected)
    assert json.loads((tmp_path / "s2.stats.json").read_text())["config"]["rollout"]["n"] == 2
    assert main(["check", cfg.out, "--tokenizer", str(tok_dir)]) == 0


def test_without_dedupe_or_min_eta_more_is_kept(tmp_path, checker):
    tok = build_tokenizer()
    recs = make_dataset(TaskConfig(), {"train": 2}, seed=4)["train"]
    prompt_ids = [chat_prompt_ids(tok, r["prompt"]) for r in recs]
    engine = PlayEngine(tok, [(prompt_ids[0], recs[0]["response_parallel"]),
                              (prompt_ids[1], recs[1]["response_sequential"])])
    cfg = Stage2Config(model="m", prompts=str(tmp_path / "p.jsonl"), out=str(tmp_path / "o.jsonl"),
                       rollout=RolloutConfig(n=2, max_tokens=1000), dedupe=False)
    write_prompts(Path(cfg.prompts), recs)
    result = run_stage2(cfg, lambda ids: generate(engine, tok, ids, cfg.rollout), tok, checker)
    assert result.stats["kept"] == 4 and result.stats["kept_parallel"] == 2


def test_a_trajectory_with_a_thread_closed_by_the_orchestrator_is_dropped(tmp_path, checker):
    """The longest thread is cut one token before its ``</Thread>``, which the orchestrator then inserts: the
    text is the same, the answer correct, but that ``</Thread>`` was never the model's."""
    tok = build_tokenizer()
    rec = make_dataset(TaskConfig(), {"train": 1}, seed=3)["train"][0]
    prompt_ids = chat_prompt_ids(tok, rec["prompt"])
    units = replay(prompt_ids, rec["response_parallel"], tok, tok.eos_token_id)
    lengths = sorted(len(u.completion_ids) for u in units if u.role == "thread")
    assert lengths[-1] > lengths[-2]  # one longest thread
    write_prompts(tmp_path / "p.jsonl", [rec])
    results = {}
    for limit in (lengths[-1], lengths[-1] - 1):
        cfg = Stage2Config(model="m", prompts=str(tmp_path / "p.jsonl"), out=str(tmp_path / f"o{limit}.jsonl"),
                           rollout=RolloutConfig(n=1, max_tokens=4000, max_thread_tokens=limit), progress=False)
        engine = PlayEngine(tok, [(prompt_ids, rec["response_parallel"])])
        results[limit] = run_stage2(cfg, lambda ids: generate(engine, tok, ids, cfg.rollout), tok, checker)
    kept, cut = results[lengths[-1]], results[lengths[-1] - 1]
    assert kept.stats["kept"] == 1 and kept.decisions[0].trajectory.closed_threads == []
    (d,) = cut.decisions
    assert d.trajectory.text == rec["response_parallel"] and d.trajectory.finish_reason == "eos"
    assert len(d.trajectory.closed_threads) == 1 and (d.kept, d.reason) == (False, "closed_thread")
    assert cut.stats["kept"] == 0 and cut.stats["dropped"] == {"closed_thread": 1}
    assert "closed by the orchestrator" in json.loads((tmp_path / f"o{lengths[-1] - 1}.rejected.jsonl")
                                                       .read_text())["detail"]


def test_bad_prompt_files_are_refused(tmp_path, checker):
    tok = build_tokenizer()
    path = tmp_path / "p.jsonl"
    cfg = Stage2Config(model="m", prompts=str(path), out=str(tmp_path / "o.jsonl"))
    for lines, message in [([{"prompt": "Compute 2*3."}], "no reference 'answer'"),
                           ([{"answer": "6"}], "no non-empty string 'prompt'")]:
        write_prompts(path, lines)
        with pytest.raises(ValueError, match=message):
            run_stage2(cfg, lambda ids: pytest.fail("sampled"), tok, checker)
    with pytest.raises(ValueError, match="min_eta"):
        Stage2Config(min_eta=1.5)


def test_cli_refuses_a_missing_model_before_starting_anything(tmp_path, capsys):
    assert main(["datagen", "stage2", f"model={tmp_path}", "prompts=x.jsonl", "out=y.jsonl"]) == 2
    assert "holds no config.json" in capsys.readouterr().err


@pytest.mark.integration
def test_untrained_tiny_model_everything_dropped_and_counted(llm, tokenizer, tiny_model_dir, tmp_path, checker):
    from rollout.engine import VLLMEngine

    recs = make_dataset(TaskConfig(), {"validation": 4}, seed=0)["validation"]
    cfg = Stage2Config(model=str(tiny_model_dir), prompts=str(tmp_path / "p.jsonl"), out=str(tmp_path / "o.jsonl"),
                       rollout=RolloutConfig(n=2, max_tokens=64, max_context=1024, temperature=1.0, seed=0),
                       progress=False)
    write_prompts(Path(cfg.prompts), recs)
    engine = VLLMEngine(llm)
    result = run_stage2(cfg, lambda ids: generate(engine, tokenizer, ids, cfg.rollout), tokenizer, checker)
    stats = result.stats
    print(summary(stats))
    assert (stats["total"], stats["kept"]) == (8, 0)
    assert sum(stats["dropped"].values()) == 8 and all(d.reason for d in result.decisions)
    assert Path(cfg.out).read_text() == ""
    assert len((tmp_path / "o.rejected.jsonl").read_text().splitlines()) == 8
