"""The P-GRPO driver: prompt order, config checks, and end-to-end runs on Ray with the tiny model.

The integration tests share one local Ray instance, one rollout pool (one vLLM
engine) and one reward pool across runs (``run_rl(..., services=...)``); each
run starts its own DeepSpeed learner. The untrained tiny model never answers
correctly, so the runs reward format validity instead (``format_penalty=1``;
random output often contains a stray tag token): rewards then differ within
groups, advantages are non-zero and the weights move. The runs take two
clipped optimizer steps per batch with a KL term, so the reference-model
actor and the clipped loss run too (the default on-policy loss is the same
code with other options).

The three fault cases share their runs (each engine start costs about a
minute here):

* run "full" (3 steps) has its rollout worker killed during step 1 (see
  ``_KillingPool``) and its tracking server down (a closed 127.0.0.1 port): the
  pool is rebuilt, the step completes and the run finishes;
* run "cut" (a checkpoint every step) is killed after step 3 in the middle of a
  metrics line, and its newest checkpoint is then damaged (``trainer_state.json``
  cut short); resumed, it falls back to step 2's checkpoint, logs step 3 once
  and ends with the weights and step-3 metrics of "full" (so the rebuilt pool
  also sampled exactly what an undisturbed one would have), in the MLflow run
  the killed driver opened.

Throughout, the driver must not fetch the weights: the learner publishes them
to the object store and the driver passes on references only (fetching them
in the driver raises).
"""

from __future__ import annotations

import json
import socket

import pytest

from cluster.cmd_rl import RLRunConfig, roles
from rl.driver import PromptState, PromptStream, step_seed
from rollout.ray_init import start_ray


def test_prompt_stream_is_seeded_reshuffled_and_resumable():
    a = PromptStream(5, seed=3)
    first = a.take(4) + a.take(4)
    assert sorted(first[:5]) == [0, 1, 2, 3, 4] and a.state == PromptState(epoch=1, offset=3, served=8)
    b = PromptStream(5, seed=3, state=PromptState(epoch=1, offset=3, served=8))
    assert a.take(6) == b.take(6)
    assert PromptStream(50, seed=4).take(50) != PromptStream(50, seed=3).take(50)


def test_step_seeds_differ_per_step_and_follow_the_base():
    assert len({step_seed(0, s) for s in range(1, 100)}) == 99
    assert step_seed(1, 1) != step_seed(0, 1) and step_seed(None, 3) is None


def test_config_requires_groups_and_lists_roles():
    from cluster.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rollout.n"):
        load_config(RLRunConfig, None, ["rollout.n=1"])
    with pytest.raises(ConfigError, match="eval.modes"):
        load_config(RLRunConfig, None, ["rollout.n=4", "eval.modes=[beam]"])
    cfg = load_config(RLRunConfig, None, ["grpo.kl_coef=0.1", "rollout.n=4", "rollout.workers=2", "learner.ranks=2"])
    assert [(r.name, r.count) for r in roles(cfg)] == [("rollout worker", 2), ("reward actor", 2),
                                                      ("learner rank", 2), ("reference model", 1)]


def test_experiment_configs_load():
    from pathlib import Path

    from cluster.config import load_config

    files = sorted(Path("experiments").glob("rl_*.yaml"))
    assert files, "no experiments/rl_*.yaml"
    for f in files:
        cfg = load_config(RLRunConfig, f)
        assert cfg.rollout.n >= 2


def test_batch_metrics_by_hand():
    from types import SimpleNamespace as T

    from rl.metrics import learner_metrics, trajectory_metrics

    trajectories = [T(n_blocks=1, threads_per_block=[3], eta=0.4, L_crit=60, L_total=100, speedup=100 / 60,
                      finish_reason="eos"),
                    T(n_blocks=2, threads_per_block=[2, 4], eta=0.2, L_crit=80, L_total=100, speedup=1.25,
                      finish_reason="budget"),
                    T(n_blocks=0, threads_per_block=[], eta=0.0, L_crit=50, L_total=50, speedup=1.0,
                      finish_reason="eos")]
    scores = [T(reward=1.2, R_correct=1.0, R_accel=0.2, format_penalty=0.0, correct=True, timed_out=False,
                format_valid=True, cut=False, error=None),
              T(reward=0.0, R_correct=0.0, R_accel=0.0, format_penalty=0.0, correct=False, timed_out=False,
                format_valid=False, cut=True, error=None),
              T(reward=1.0, R_correct=1.0, R_accel=0.0, format_penalty=0.0, correct=True, timed_out=False,
                format_valid=True, cut=False, error="ValueError: x")]
    m = trajectory_metrics(trajectories, scores, "train/")
    assert m["train/reward"] == pytest.approx(2.2 / 3) and m["train/R_accel"] == pytest.approx(0.2 / 3)
    assert m["train/activation"] == pytest.approx(2 / 3) and m["train/threads_per_block"] == pytest.approx(3.0)
    assert m["train/correct_with_block"] == 0.5 and m["train/correct_without_block"] == 1.0
    assert m["train/L_crit"] == pytest.approx(190 / 3) and m["train/format_error"] == pytest.approx(1 / 3)
    assert m["train/finish/eos"] == pytest.approx(2 / 3) and m["train/finish/budget"] == pytest.approx(1 / 3)
    assert m["train/finish/error"] == 0.0
    assert m["train/cut"] == pytest.approx(1 / 3) and m["train/score_error"] == pytest.approx(1 / 3)
    assert learner_metrics([], 10, 0.0)["learner/skipped"] == 1.0
    # first update: 10 tokens, ratios 1.5 (x4) and 0.75 (x6): deviations sum 4*0.5 - 6*0.25 = 0.5,
    # |.| sum 2 + 1.5 = 3.5, squares 4*0.25 + 6*0.0625 = 1.375
    two = learner_metrics([{"loss": 1.0, "pg_sum": 5.0, "kl_sum": 0.0, "clipped": 0.0, "targets": 10.0,
                            "grad_norm": 1.0, "lr": 1e-3, "tokens": 20.0, "lp_absdiff_sum": 0.5, "lp_count": 10.0,
                            "ratio_dev_sum": 0.5, "ratio_absdev_sum": 3.5, "ratio_sqdev_sum": 1.375},
                           {"loss": 0.5, "pg_sum": 4.0, "kl_sum": 2.0, "clipped": 5.0, "targets": 10.0,
                            "grad_norm": 0.5, "lr": 1e-3, "tokens": 20.0, "lp_absdiff_sum": 9.0, "lp_count": 10.0,
                            "ratio_dev_sum": 9.0, "ratio_absdev_sum": 9.0, "ratio_sqdev_sum": 9.0}],
                          n_tokens=10, learn_s=2.0)
    assert (two["loss/total"], two["loss/pg"], two["loss/kl"], two["loss/clip_frac"]) == (0.5, 0.4, 0.2, 0.25)
    assert two["logprob/rollout_learner_absdiff"] == 0.05 and two["learner/tokens_per_s"] == 20.0
    assert two["ratio/mean"] == pytest.approx(1.05) and two["ratio/absdev_mean"] == pytest.approx(0.35)
    assert two["ratio/std"] == pytest.approx((0.1375 - 0.05 ** 2) ** 0.5)  # E[(r-1)^2] - E[r-1]^2


def test_ray_plan_refuses_what_the_cluster_cannot_hold():
    from cluster.ray_setup import Role, check_fits

    plan = [Role("rollout worker", 2, 1.0, 1.0), Role("learner rank", 2, 1.0, 1.0)]
    check_fits(plan, {"CPU": 8.0, "GPU": 4.0})
    with pytest.raises(RuntimeError, match="4 GPU needed, 2 in the cluster"):
        check_fits(plan, {"CPU": 8.0, "GPU": 2.0})


# --------------------------------------------------------------------------- integration


def _config(tmp_path, run: str, model_dir, **kw) -> RLRunConfig:
    from cluster.config import load_config

    overrides = [
        f"model={model_dir}", f"run_dir={tmp_path / run}", f"data.dir={tmp_path / 'data'}", "data.generate=true",
        "data.train_size=40", "data.validation_size=4", "data.test_size=4", "steps=3", "prompts_per_step=2",
        "save_every=2", "keep_last=0", "rollout.n=3", "rollout.max_tokens=48", "rollout.max_context=256",
        "rollout.max_thread_tokens=16", "rollout.weight_bucket_mb=0.5", "reward.format_penalty=1.0",
        "reward.num_actors=1", "grpo.updates_per_batch=2", "grpo.kl_coef=0.05", "learner.lr=3e-3",
        "learner.row_tokens=512", "learner.threads_per_rank=1",
        "eval.at_start=false", "eval.every=0", "eval.at_end=false", "eval.prompts=2", "tracking.experiment=test",
    ]
    overrides += [f"{k}={v}" for k, v in kw.items()]
    return load_config(RLRunConfig, None, overrides)


@pytest.fixture(scope="module")
def services(tiny_model_dir, tmp_path_factory):
    import ray

    from rl.services import start_services, stop_services

    start_ray(None, num_cpus=4, include_dashboard=False)  # as the commands start it
    try:
        cfg = _config(tmp_path_factory.mktemp("svc"), "x", tiny_model_dir)
        svc = start_services(cfg.rollout, cfg.reward, cfg.grpo, cfg.learner, tiny_model_dir)
        yield svc
        stop_services(svc)
    finally:
        ray.shutdown()


def _weights(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in open(path)]


class _KillingPool:
    """A rollout pool whose worker is killed at the first progress tick of its first rollout.

    The tick comes after half a second: the worker dies in the middle of that
    rollout if it is still running (the usual case here), else right after it,
    and the step's weight sync then finds it dead. Either way the driver must
    rebuild the pool once and complete the step.
    """

    def __init__(self, pool):
        self.pool = pool
        self.killed = False

    def __getattr__(self, name):
        return getattr(self.pool, name)

    def generate(self, prompts, progress=None, **kw):
        import ray

        if self.killed:
            return self.pool.generate(prompts, progress=progress, **kw)

        def kill_then_report(done: int) -> None:  # the driver's own progress bar still gets every count
            if not self.killed:
                self.killed = True
                ray.kill(self.pool.workers[0])
            if progress is not None:
                progress(done)

        return self.pool.generate(prompts, progress=kill_then_report, **kw)


@pytest.mark.integration
def test_faults_worker_killed_tracking_down_driver_killed_and_resumed(services, tiny_model_dir, tmp_path, capsys,
                                                                      monkeypatch):
    from mlflow import MlflowClient

    from cluster.tracking import metric_table
    from cluster.cmd_rl import run_rl as train
    from rl.checkpoint import Stop

    # the weights never come into the driver: not at start, in a step, in the pool's rebuild, nor on resume
    def held_by_the_driver(*args, **kwargs):
        raise AssertionError("the driver fetched the weights")

    for name in ("rl.learner.LearnerGroup.state_dict", "rl.learner.LearnerGroup.weight_buckets",
                 "rollout.weights.publish_state_dict"):
        monkeypatch.setattr(name, held_by_the_driver)

    # two steps a run: the cut run dies after its last step, with a checkpoint before it to fall back on, and a
    # resumed step must still land on the weights, metrics and MLflow run of the uninterrupted one (a third step
    # would only repeat step 2's rollout, update and sync in both runs)
    # --- "full": a rollout worker dies mid-rollout, MLflow is unreachable
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    killing = _KillingPool(services.rollout)
    services.rollout = killing
    full = train(_config(tmp_path, "full", tiny_model_dir, steps=2, **{
        "tracking.uri": f"http://127.0.0.1:{closed}", "tracking.request_timeout_s": 2}), services=services)
    assert killing.killed and full["rollout_restarts"] == 1
    assert services.rollout is not killing  # a rebuilt pool, which the fixture shuts down
    assert full["steps"] == 2 and full["mlflow_run_id"] is None
    full_steps = [x for x in _lines(tmp_path / "full" / "metrics.jsonl") if x["kind"] == "train"]
    assert [x["rollout/restarts"] for x in full_steps] == [1, 1]
    assert any(x["adv/nonzero_share"] > 0 for x in full_steps)
    assert all(x["logprob/rollout_learner_absdiff"] < 1e-3 for x in full_steps)  # vLLM and the learner agree
    assert any(x["loss/kl"] > 0 for x in full_steps)  # a second update leaves the reference (given a gradient)

    # --- "cut": the driver dies after step 2, its checkpoint of step 2 is damaged, then it resumes
    def kill_after_2(step, metrics):
        if step == 2:  # computed, logged and saved
            raise Stop()

    cut_store = {"tracking.uri": f"sqlite:///{(tmp_path / 'cut_mlflow.db').resolve()}"}  # this run's own store
    with pytest.raises(Stop):
        train(_config(tmp_path, "cut", tiny_model_dir, steps=2, save_every=1, **cut_store), on_step=kill_after_2,
              services=services)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "train/rew')  # the kill came in the middle of a line
    with pytest.raises(ValueError, match="--resume"):
        train(_config(tmp_path, "cut", tiny_model_dir, steps=2, save_every=1, **cut_store), services=services)
    state_file = tmp_path / "cut" / "checkpoints" / "step_00000002" / "trainer_state.json"
    state_file.write_text(state_file.read_text()[:40])
    capsys.readouterr()
    resumed = train(_config(tmp_path, "cut", tiny_model_dir, steps=2, resume="auto", save_every=1,
                            **{"eval.at_end": "true"}, **cut_store), services=services)
    assert resumed["steps"] == 2
    out = capsys.readouterr()
    assert "step_00000001 at step 1" in out.out and "unreadable trainer_state.json" in out.err

    a, b = _weights(full["checkpoint"]), _weights(resumed["checkpoint"])
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    init = _weights(tiny_model_dir)
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-4  # it trained
    cut_steps = [x for x in _lines(tmp_path / "cut" / "metrics.jsonl") if x["kind"] == "train"]
    assert [x["step"] for x in cut_steps] == [1, 2]  # step 2 was redone and logged once
    for key in ("train/reward", "train/L_total", "loss/total", "learner/grad_norm", "data/prompts_seen"):
        assert [x[key] for x in cut_steps] == pytest.approx([x[key] for x in full_steps], rel=1e-6), key

    # --- MLflow: one run, reopened by the resumed driver, with params, per-step metrics and artifacts
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step_00000001" / "trainer_state.json").read_text())
    assert resumed["mlflow_run_id"] == state["mlflow_run_id"] is not None
    uri = resumed["tracking_uri"]
    assert uri == cut_store["tracking.uri"]
    client = MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name("test").experiment_id])) == 1
    run = client.get_run(resumed["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["reward.format_penalty"] == "1.0" and run.data.params["grpo.advantage"] == "mean"
    table = metric_table(uri, run.info.run_id, ["train/reward", "time/rollout_s", "eval/parallel/accuracy",
                                                "eval/sequential/L_total"])
    assert [r["step"] for r in table] == [1, 2] and all("time/rollout_s" in r for r in table)
    assert "eval/parallel/accuracy" in table[-1] and "eval/sequential/L_total" in table[-1]
    artifacts = {x.path for x in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "config_resume_step_1.yaml", "eval", "pages", "summary.json"} <= artifacts
    pages = {x.path for x in client.list_artifacts(run.info.run_id, "pages")}
    assert "pages/step_00000002.html" in pages  # the viewer page of the last evaluation
    evals = _lines(tmp_path / "cut" / "eval" / "step_00000002.jsonl")
    assert sorted({(x["mode"], x["index"]) for x in evals}) == [("parallel", 0), ("parallel", 1),
                                                                 ("sequential", 0), ("sequential", 1)]


@pytest.mark.integration
def test_overlapped_run_killed_after_step_2_resumes_to_the_weights_of_the_uninterrupted_one(services, tiny_model_dir,
                                                                                         tmp_path):
    """``max_staleness=1`` with one (clipped) update per batch and no KL term (so a batch without advantages takes
    no optimizer step and ``learner/skipped`` says whether a step moved the weights): step 3's batch, sampled by
    step 1's weights while the learner trained on step 2, is in step 2's checkpoint; the resumed run learns from
    it and ends where an uninterrupted run ends (sampling it again with step 2's weights would end elsewhere)."""
    from cluster.cmd_rl import run_rl as train
    from rl.checkpoint import Stop

    def overlapped(run: str, **kw):
        return _config(tmp_path, run, tiny_model_dir, max_staleness=1, save_every=1, **{
            "grpo.updates_per_batch": 1, "grpo.kl_coef": 0,
            "tracking.uri": f"sqlite:///{(tmp_path / (run + '.db')).resolve()}"}, **kw)

    full = train(overlapped("full"), services=services)
    full_steps = [x for x in _lines(tmp_path / "full" / "metrics.jsonl") if x["kind"] == "train"]
    assert [x["rollout/staleness"] for x in full_steps] == [0, 1, 1]
    # a step whose advantages are all 0 takes no optimizer step and measures no ratio (the untrained model's
    # first batch often has none)
    moved = [x["learner/skipped"] == 0 for x in full_steps]
    ratio = [x.get("ratio/absdev_mean") for x in full_steps]
    assert [r is not None for r in ratio] == moved
    assert ratio[0] is None or ratio[0] < 1e-3  # on-policy: vLLM and the learner agree
    # step t learns from step t-2's weights: the ratio leaves 1 exactly when step t-1 moved the weights
    stale = [(r > 1e-3, m) for r, m in zip(ratio[1:], moved[:-1]) if r is not None]
    assert any(m for _, m in stale), "no learning step followed a step that moved the weights: nothing stale checked"
    assert all(left == m for left, m in stale), (ratio, moved)

    def kill_after_2(step, metrics):
        if step == 2:
            raise Stop()

    with pytest.raises(Stop):
        train(overlapped("cut"), on_step=kill_after_2, services=services)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    pending = state["overlap"]["pending"]
    assert pending["request"]["step"] == 3 and pending["version"] == 1  # sampled by step 1's weights
    resumed = train(overlapped("cut", resume="auto"), services=services)
    assert resumed["steps"] == 3
    a, b = _weights(full["checkpoint"]), _weights(resumed["checkpoint"])
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    cut_steps = [x for x in _lines(tmp_path / "cut" / "metrics.jsonl") if x["kind"] == "train"]
    for key in ("train/reward", "train/L_total", "loss/total", "learner/grad_norm", "rollout/staleness"):
        assert [x[key] for x in cut_steps] == pytest.approx([x[key] for x in full_steps], rel=1e-6), key
