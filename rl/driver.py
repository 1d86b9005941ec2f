"""``threadweaver rl``: the P-GRPO training loop on Ray (DESIGN sections 6 and 7).

What one step really does:

1. takes the next ``prompts_per_step`` training prompts (a seeded order,
   reshuffled every epoch; the position is saved in checkpoints);
2. samples ``rollout.n`` (= k) trajectories per prompt with the spawn/join
   orchestrator on the Ray rollout workers (``rollout.workers.RolloutPool``),
   with sampling seeds derived from ``rollout.seed`` and the step, so a resumed
   run samples what the uninterrupted one would have;
3. scores them on the reward actors (``rewards.service.RewardPool``):
   correctness plus the critical-path bonus, every component kept;
4. computes group advantages (mean-centred, or std-normalised with a floor:
   :mod:`rl.grpo`) and builds one trie per group whose unit weights are the
   advantages, so every completion token of every unit of a trajectory gets
   its advantage;
5. packs the tries into rows of at most ``learner.row_tokens`` tokens and runs
   ``grpo.updates_per_batch`` optimizer steps on the DeepSpeed learner ranks
   with the ``"pgrpo"`` loss, normalised by the number of completion tokens of
   the whole batch (one step: on-policy; more: PPO-clipped ratios against the
   rollout's log-probabilities); with ``grpo.kl_coef > 0`` a reference-model
   actor adds the log-probabilities of the starting checkpoint. Groups whose
   advantages are all 0 are not forwarded (``grpo.skip_zero_advantage``), and
   a batch without any non-zero advantage takes no optimizer step and no
   weight sync (``learner/skipped`` = 1);
6. sends the new weights to every rollout worker in buckets
   (``RolloutPool.update_weights``) and times it;
7. logs the step's metrics to ``RUN_DIR/metrics.jsonl`` and MLflow
   (:mod:`cluster.tracking`), checkpoints every ``save_every`` steps, and
   evaluates every ``eval.every`` steps.

Evaluation decodes held-out prompts greedily on the same rollout workers, in
parallel (spawn/join) and sequential mode, scores them with the reward actors
and logs accuracy, reward, format validity, activation ratio, ``L_total``,
``L_crit``, ``eta`` and finish reasons per mode; every decoded trajectory goes
to ``RUN_DIR/eval/step_N.jsonl`` and to MLflow as an artifact, with a viewer
page of the first 40 (``eval/step_N.html``, MLflow artifact ``pages/``).

Failures: a rollout worker that dies (or whose engine dies) during a
rollout or a weight sync makes the driver rebuild the rollout pool, load the
learner's current weights into it and redo that rollout or sync (at most
``max_rollout_restarts`` times per step); reward actors are replaced by the
reward service itself; a dead learner or driver is recovered by resuming
from the newest complete checkpoint (``--resume``; :mod:`rl.checkpoint` passes
over a damaged one), which restores the step, the prompt order, the optimizer,
scheduler and RNG states, trims ``metrics.jsonl`` to that step
(:mod:`rl.metrics_log`) and reopens the same MLflow run. MLflow being
unreachable only produces warnings.

Outputs in ``run_dir``: ``config.yaml`` (resolved; ``config_resume_step_N.yaml``
on resume), ``metrics.jsonl``, ``eval/step_N.jsonl``, ``checkpoints/``
(``rl.checkpoint``), ``summary.json``, and the local MLflow store
(``mlflow.db``, ``mlartifacts/``) unless a tracking URI is given.

Usage: ``threadweaver rl --config experiments/rl_tiny.yaml [key.sub=value ...] [--resume]``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from cluster.ray_setup import RayConfig, Role
from cluster.tracking import TrackingConfig
from rewards.config import RewardConfig
from rl.grpo import GRPOConfig
from rl.learner import LearnerConfig
from rl.metrics_log import MetricsLog
from rl.sft_data import check_data_config
from rollout.config import RolloutConfig, check_ranges, set_runtime_defaults
from rollout.files import atomic_write, check_model_dir, check_output_dir, write_text
from rollout.task import TaskConfig

MODES = ("parallel", "sequential")


@dataclass
class RLDataConfig:
    """Training and held-out prompts with their reference answers."""

    dir: str = field(default="runs/data/tiny", metadata={"help": "folder holding the train/validation files"})
    train_file: str = field(default="train.jsonl", metadata={"help": "training records in dir (.jsonl/.parquet)"})
    validation_file: str = field(default="validation.jsonl", metadata={
        "help": "held-out records: a file in dir, or an absolute path"})
    prompt_field: str = field(default="prompt", metadata={"help": "record field holding the prompt text"})
    answer_field: str = field(default="answer", metadata={"help": "record field holding the reference answer"})
    generate: bool = field(default=False, metadata={
        "help": "write the synthetic task into dir when its files are missing (same rule as the SFT stage: a "
                "folder made with other settings is an error)"})
    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "synthetic task knobs (generate only)"})
    train_size: int = field(default=20000, metadata={
        "help": "synthetic training problems (generate only)", "range": ">= 1"})
    validation_size: int = field(default=200, metadata={
        "help": "synthetic validation problems (generate only)", "range": ">= 1"})
    test_size: int = field(default=200, metadata={"help": "synthetic test problems (generate only)", "range": ">= 0"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic data (generate only)", "range": ">= 0"})

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class RLEvalConfig:
    """Held-out evaluation: greedy decoding on the rollout workers, scored by the reward actors."""

    every: int = field(default=10, metadata={
        "help": "evaluate every this many steps (0: never during training)", "range": ">= 0"})
    at_start: bool = field(default=True, metadata={"help": "evaluate the starting weights before step 1"})
    at_end: bool = field(default=True, metadata={"help": "evaluate after the last step"})
    prompts: int = field(default=200, metadata={
        "help": "held-out prompts decoded per evaluation (count)", "range": ">= 1"})
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={
        "help": "decoding modes: 'parallel' (spawn/join) and/or 'sequential' (spawning off)"})

    def __post_init__(self) -> None:
        check_ranges(self)
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"eval.modes must be a non-empty subset of {list(MODES)}, got {self.modes}")


@dataclass
class RLConfig:
    """The P-GRPO stage: model, prompts, rollout, reward, objective, learner, evaluation, tracking, Ray."""

    model: str | None = field(default=None, metadata={
        "help": "starting checkpoint (Hugging Face folder, tags as single tokens), e.g. the SFT stage's "
                "RUN_DIR/checkpoints/step_N/hf (required)"})
    run_dir: str = field(default="runs/rl", metadata={"help": "output folder of this run"})
    steps: int = field(default=100, metadata={"help": "training steps, one rollout batch each", "range": ">= 1"})
    prompts_per_step: int = field(default=8, metadata={
        "help": "prompts per step; each gets rollout.n samples", "range": ">= 1"})
    seed: int = field(default=0, metadata={"help": "seed of the prompt order", "range": ">= 0"})
    save_every: int = field(default=10, metadata={
        "help": "checkpoint every this many steps (0: only at the end)", "range": ">= 0"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept on disk (0: all)", "range": ">= 0"})
    resume: str | None = field(default=None, metadata={
        "help": "'auto': continue from RUN_DIR's newest checkpoint if any; a path: from that checkpoint; null: "
                "start fresh (refused when RUN_DIR already has checkpoints)"})
    max_rollout_restarts: int = field(default=3, metadata={
        "help": "rebuilds of the rollout pool allowed per step after a worker or engine died (count)", "range": ">= 0"})
    data: RLDataConfig = field(default_factory=RLDataConfig, metadata={"help": "prompts"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={
        "help": "sampling (n = k samples per prompt, at least 2: set it) and rollout workers"})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "reward weights and service"})
    grpo: GRPOConfig = field(default_factory=GRPOConfig, metadata={"help": "advantages and loss"})
    learner: LearnerConfig = field(default_factory=LearnerConfig, metadata={"help": "DeepSpeed learner ranks"})
    eval: RLEvalConfig = field(default_factory=RLEvalConfig, metadata={"help": "held-out evaluation"})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"help": "MLflow"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray"})

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.rollout.n < 2:
            raise ValueError(f"rollout.n (samples per prompt) must be >= 2 for group advantages, got {self.rollout.n}")


def roles(cfg: RLConfig) -> list[Role]:
    """The actors this run starts, with their reservations (see ``cluster.ray_setup``)."""
    out = [Role("rollout worker", cfg.rollout.workers, cfg.rollout.cpus_per_worker, cfg.rollout.gpus_per_worker),
           Role("reward actor", cfg.reward.num_actors, cfg.reward.actor_cpus),
           Role("learner rank", cfg.learner.ranks, cfg.learner.cpus_per_rank, cfg.learner.gpus_per_rank)]
    if cfg.grpo.kl_coef > 0:
        out.append(Role("reference model", 1, cfg.learner.cpus_per_rank, cfg.learner.gpus_per_rank))
    return out


# --------------------------------------------------------------------------- prompts


@dataclass
class PromptState:
    """Where the prompt order stands: ``offset`` prompts served in ``epoch``; ``served`` in all."""

    epoch: int = 0
    offset: int = 0
    served: int = 0


class PromptStream:
    """Record indices in a seeded order, a new permutation every epoch."""

    def __init__(self, size: int, seed: int, state: PromptState | None = None):
        if size < 1:
            raise ValueError("no training prompts")
        self.size, self.seed = size, seed
        self.state = PromptState(**asdict(state)) if state is not None else PromptState()
        self._order = self._permutation(self.state.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            out.append(self._order[self.state.offset])
            self.state.offset += 1
            self.state.served += 1
            if self.state.offset == self.size:
                self.state.epoch += 1
                self.state.offset = 0
                self._order = self._permutation(self.state.epoch)
        return out


def step_seed(base: int | None, step: int) -> int | None:
    """The rollout seed of ``step`` (1-based): distinct per step, fixed by the base seed."""
    return None if base is None else base * 1_000_003 + step


# --------------------------------------------------------------------------- services


class Stop(Exception):
    """Raised by an ``on_step`` hook to end a run at once, as if the driver were killed."""


@dataclass
class Services:
    """The long-lived actors besides the learner: rollout pool, reward pool, optional reference model.

    Passed to :func:`train` by tests that reuse engines across runs; the
    driver then does not shut them down (it may replace a dead rollout pool).
    """

    rollout: object
    rewards: object
    reference: object | None = None


def start_services(cfg: RLConfig, model_dir: str | Path) -> Services:
    """Start the reward pool, the rollout pool on ``model_dir`` and (with a KL term) the reference model."""
    import ray

    from rewards.service import RewardPool
    from rl.grpo import ReferenceModel
    from rollout.workers import RolloutPool

    rewards = RewardPool(cfg.reward)
    rollout = RolloutPool(model_dir, cfg.rollout)
    reference = None
    if cfg.grpo.kl_coef > 0:
        lc = cfg.learner
        reference = ray.remote(ReferenceModel).options(num_cpus=lc.cpus_per_rank, num_gpus=lc.gpus_per_rank).remote(
            str(model_dir), lc.attention, lc.threads_per_rank or max(1, int(lc.cpus_per_rank)),
            "cuda" if lc.on_gpu else "cpu", lc.dtype)
    rewards.wait_ready()
    return Services(rollout, rewards, reference)


def stop_services(services: Services) -> None:
    import ray

    for what in ("rollout", "rewards"):
        try:
            obj = getattr(services, what)
            obj.shutdown() if what == "rollout" else obj.close()
        except Exception as e:  # noqa: BLE001 - best effort at teardown, reported
            print(f"rl: could not stop the {what} service cleanly: {type(e).__name__}: {e}", file=sys.stderr)
    if services.reference is not None:
        ray.kill(services.reference)


def _rollout_died(e: BaseException) -> bool:
    """A dead rollout worker actor, or a worker whose vLLM engine died."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(e, RayActorError):
        return True
    return isinstance(e, RayTaskError) and "EngineDead" in type(getattr(e, "cause", None)).__name__


class Rollouts:
    """The rollout pool with recovery: a dead worker rebuilds the pool, loads the current weights, retries."""

    def __init__(self, services: Services, model_dir: str | Path, cfg: RolloutConfig, max_restarts: int,
                 weights: Callable[[], dict]):
        self.services, self.model_dir, self.cfg = services, str(model_dir), cfg
        self.max_restarts, self.weights = max_restarts, weights
        self.restarts = 0

    def _call(self, what: str, fn):
        from rollout.workers import RolloutPool

        for attempt in range(self.max_restarts + 1):
            try:
                return fn(self.services.rollout)
            except Exception as e:  # noqa: BLE001 - only a dead worker is retried, the rest re-raised
                if not _rollout_died(e) or attempt == self.max_restarts:
                    raise
                print(f"rl: a rollout worker died during {what} ({type(e).__name__}); rebuilding the rollout pool "
                      f"(restart {attempt + 1} of at most {self.max_restarts} this step)", file=sys.stderr,
                      flush=True)
                try:
                    self.services.rollout.shutdown()
                except Exception:  # noqa: BLE001 - the dead worker cannot answer; the others were killed
                    pass
                self.services.rollout = RolloutPool(self.model_dir, self.cfg)
                self.services.rollout.update_weights(self.weights())
                self.restarts += 1
        raise AssertionError("unreachable")

    def generate(self, prompts: Sequence[Sequence[int]], config: RolloutConfig):
        return self._call("a rollout", lambda pool: pool.generate(prompts, config=config))

    def update_weights(self, state_dict: dict):
        return self._call("a weight sync", lambda pool: pool.update_weights(state_dict))


# --------------------------------------------------------------------------- metrics


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def trajectory_metrics(trajectories, scores, prefix: str) -> dict[str, float]:
    """Means over a batch: reward and its components, correctness (also apart for trajectories with and
    without a block; NaN when there are none), parallelism, format, finish reasons."""
    n = len(trajectories)
    blocks = [k for t in trajectories for k in t.threads_per_block]
    out = {
        f"{prefix}reward": _mean([s.reward for s in scores]),
        f"{prefix}R_correct": _mean([s.R_correct for s in scores]),
        f"{prefix}R_accel": _mean([s.R_accel for s in scores]),
        f"{prefix}format_penalty": _mean([s.format_penalty for s in scores]),
        f"{prefix}correct": _mean([float(s.correct) for s in scores]),
        f"{prefix}check_timed_out": _mean([float(s.timed_out) for s in scores]),
        f"{prefix}format_error": _mean([float(not s.format_valid) for s in scores]),
        f"{prefix}cut": _mean([float(s.cut) for s in scores]),
        f"{prefix}score_error": _mean([float(s.error is not None) for s in scores]),
        f"{prefix}activation": _mean([float(t.n_blocks > 0) for t in trajectories]),
        f"{prefix}correct_with_block": _mean([float(s.correct) for t, s in zip(trajectories, scores) if t.n_blocks]),
        f"{prefix}correct_without_block": _mean([float(s.correct) for t, s in zip(trajectories, scores)
                                                 if not t.n_blocks]),
        f"{prefix}blocks": _mean([float(t.n_blocks) for t in trajectories]),
        f"{prefix}threads_per_block": _mean([float(k) for k in blocks]),
        f"{prefix}eta": _mean([t.eta for t in trajectories]),
        f"{prefix}L_crit": _mean([float(t.L_crit) for t in trajectories]),
        f"{prefix}L_total": _mean([float(t.L_total) for t in trajectories]),
        f"{prefix}speedup": _mean([t.speedup for t in trajectories]),
    }
    reasons = Counter(t.finish_reason for t in trajectories)
    from rollout.orchestrator import FINISH_REASONS

    for reason in FINISH_REASONS:
        out[f"{prefix}finish/{reason}"] = reasons.get(reason, 0) / n if n else float("nan")
    return out


def learner_metrics(learn: list[dict], n_tokens: int, learn_s: float) -> dict[str, float]:
    """Loss terms, gradient and throughput of a step's optimizer steps (``learn``: one dict per update).

    ``learner/skipped`` is 1 when the batch had no non-zero advantage and no
    optimizer step was taken (the other values are then 0).
    """
    if not learn:
        return {"learner/skipped": 1.0, "loss/total": 0.0, "loss/pg": 0.0, "loss/kl": 0.0, "loss/clip_frac": 0.0,
                "learner/grad_norm": 0.0, "learner/tokens_per_s": 0.0}
    first, last = learn[0], learn[-1]
    return {
        "learner/skipped": 0.0,
        "loss/total": last["loss"],
        "loss/pg": last["pg_sum"] / n_tokens,
        "loss/kl": last["kl_sum"] / n_tokens,
        "loss/clip_frac": (sum(m["clipped"] for m in learn) / max(sum(m["targets"] for m in learn), 1.0)
                           if len(learn) > 1 else 0.0),
        "learner/grad_norm": last["grad_norm"],
        "learner/lr": last["lr"],
        "learner/tokens_per_s": sum(m["tokens"] for m in learn) / max(learn_s, 1e-9),
        # the first update runs on the weights that sampled the batch
        "logprob/rollout_learner_absdiff": first["lp_absdiff_sum"] / max(first["lp_count"], 1.0),
    }


# --------------------------------------------------------------------------- evaluation


#: trajectories of each evaluation shown on its viewer page
PAGE_TRAJECTORIES = 40


def eval_page(records_file: Path, title: str) -> Path | None:
    """The viewer page (``cluster.viewer``) of an evaluation's first records, next to the file; None on failure.

    A page that cannot be rendered only costs a warning: it never stops training.
    """
    from cluster.viewer import read_jsonl, write_page

    try:
        return write_page(records_file.with_suffix(".html"), read_jsonl(records_file)[:PAGE_TRAJECTORIES],
                          title=title)
    except Exception as e:  # noqa: BLE001
        print(f"rl: warning: no viewer page for {records_file}: {e}", file=sys.stderr, flush=True)
        return None


def evaluate(cfg: RLConfig, rollouts: Rollouts, reward_pool, prompts: list[list[int]], answers: list[str],
             step: int, run_dir: Path) -> tuple[dict[str, float], Path]:
    """Greedy decoding of the held-out prompts in each mode; metrics ``eval/<mode>/...`` and the records file."""
    from rewards.score import RewardItem

    metrics: dict[str, float] = {}
    start = time.perf_counter()
    out = run_dir / "eval" / f"step_{step:08d}.jsonl"
    with atomic_write(out) as f:
        for mode in cfg.eval.modes:
            rc = replace(cfg.rollout, temperature=0.0, n=1, sequential=mode == "sequential", seed=0)
            t0 = time.perf_counter()
            trajectories = rollouts.generate(prompts, rc)
            decode_s = time.perf_counter() - t0
            scores = reward_pool.score_batch([RewardItem(t.text, answers[t.prompt_index], t.units, t.finish_reason)
                                              for t in trajectories])
            m = trajectory_metrics(trajectories, scores, f"eval/{mode}/")
            m[f"eval/{mode}/accuracy"] = m.pop(f"eval/{mode}/correct")
            m[f"eval/{mode}/decode_s"] = decode_s
            metrics.update(m)
            for t, s in zip(trajectories, scores):
                f.write(json.dumps({"step": step, "mode": mode, "index": t.prompt_index,
                                    "answer": answers[t.prompt_index], "text": t.text,
                                    "finish_reason": t.finish_reason, "L_total": t.L_total, "L_crit": t.L_crit,
                                    "eta": t.eta, "n_blocks": t.n_blocks, **s.to_dict()}) + "\n")
    if "eval/parallel/L_crit" in metrics and "eval/sequential/L_total" in metrics:
        metrics["eval/crit_over_sequential"] = metrics["eval/parallel/L_crit"] / metrics["eval/sequential/L_total"]
    metrics["eval/seconds"] = time.perf_counter() - start
    return metrics, out


# --------------------------------------------------------------------------- the loop


def _resume_path(cfg: RLConfig, ckpt_root: Path) -> Path | None:
    from rl import checkpoint

    return checkpoint.resume_point(cfg.resume, ckpt_root, "--resume (resume=auto)")


def check_inputs(cfg: RLConfig) -> None:
    """What ``train`` needs, checked before it starts anything: the model, no checkpoints in ``run_dir``
    unless resuming, ``run_dir`` writable (created), the data files (or ``data.dir`` writable when they are
    generated). ValueError with one line naming the key otherwise."""
    check_model_dir(cfg.model, "model")
    _resume_path(cfg, Path(cfg.run_dir) / "checkpoints")
    check_output_dir(cfg.run_dir, "run_dir")
    check_data_config(cfg.data)


def _load_data(cfg: RLConfig) -> tuple[list[dict], list[dict]]:
    from rl.sft_data import ensure_task_data, read_records

    d = cfg.data
    data_dir = Path(d.dir)
    if d.generate:
        ensure_task_data(data_dir, d.task, {"train": d.train_size, "validation": d.validation_size,
                                            "test": d.test_size}, d.seed)
    train, val = read_records(data_dir / d.train_file), read_records(data_dir / d.validation_file)
    for name, records in (("training", train), ("validation", val)):
        bad = [i for i, r in enumerate(records) if not isinstance(r.get(d.prompt_field), str)
               or r.get(d.answer_field) is None]
        if bad:
            raise ValueError(f"{name} records {bad[:5]} lack a string '{d.prompt_field}' or an '{d.answer_field}'")
    if not train:
        raise ValueError(f"no training records in {data_dir / d.train_file}")
    return train, val


def train(cfg: RLConfig, on_step: Callable[[int, dict], None] | None = None,
          services: Services | None = None) -> dict:
    """Run the P-GRPO stage (see module doc); returns the summary also written to ``summary.json``.

    ``on_step(step, metrics)`` runs after every step (after its checkpoint and
    evaluation); raising :class:`Stop` there ends the run on the spot, as a
    killed driver would (no final checkpoint, the MLflow run left open).
    ``services`` reuses running rollout/reward actors (see :class:`Services`).
    """
    import ray
    import yaml

    from cluster.config import to_dict
    from cluster.ray_setup import init_ray
    from cluster.tracking import Tracker
    from rewards.score import RewardItem
    from rl import checkpoint
    from rl.grpo import batch_advantages, completion_tokens, has_weight, rl_tries, with_reference
    from rl.learner import LearnerGroup, strip_row
    from rl.trie import pack_tries, tree_stats
    from rollout.tiny import load_tokenizer
    from rollout.units import chat_prompt_ids

    wall_start = time.perf_counter()
    check_inputs(cfg)
    model_dir = Path(cfg.model)
    run_dir = Path(cfg.run_dir)
    ckpt_root = run_dir / "checkpoints"
    resume = _resume_path(cfg, ckpt_root)
    resolved = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    config_file = run_dir / "config.yaml"
    if resume is None:
        write_text(config_file, resolved)

    tokenizer = load_tokenizer(model_dir)
    train_records, val_records = _load_data(cfg)
    d = cfg.data
    val_chosen = val_records[:cfg.eval.prompts]
    val_prompts = [chat_prompt_ids(tokenizer, r[d.prompt_field]) for r in val_chosen]
    val_answers = [str(r[d.answer_field]) for r in val_chosen]
    k = cfg.rollout.n
    updates = cfg.grpo.updates_per_batch
    options = cfg.grpo.loss_options()

    started_ray = init_ray(cfg.ray, roles(cfg))
    own_services = services is None
    group = None
    tracker = Tracker(cfg.tracking, run_dir)
    status = "FAILED"
    try:
        group = LearnerGroup(cfg.learner, model_dir, total_steps=cfg.steps * updates)
        state: dict = {"data": asdict(PromptState()), "mlflow_run_id": None, "totals": {}, "rollout_restarts": 0}
        step = 0
        if resume is not None:
            state = checkpoint.load(group, resume)
            step = state["step"]
            config_file = run_dir / f"config_resume_step_{step}.yaml"
            write_text(config_file, resolved)
            print(f"rl: resumed from {resume} at step {step}", flush=True)
        totals: dict[str, float] = Counter(state["totals"])
        stream = PromptStream(len(train_records), cfg.seed, PromptState(**state["data"]))
        run_id = tracker.start(to_dict(cfg, flat=True), run_id=state["mlflow_run_id"],
                               tags={"stage": "rl", "resumed_from_step": str(step)} if resume else {"stage": "rl"})
        tracker.log_artifact(config_file)
        if run_id is not None:
            print(f"rl: MLflow run {run_id} at {tracker.uri}", flush=True)

        if services is None:
            services = start_services(cfg, model_dir)
        rollouts = Rollouts(services, model_dir, cfg.rollout, cfg.max_rollout_restarts, group.state_dict)
        rollouts.restarts = int(state["rollout_restarts"])
        if resume is not None or not own_services:
            rollouts.update_weights(group.state_dict())  # the pool holds other weights than the learner

        def trainer_state() -> dict:
            return {"data": asdict(stream.state), "mlflow_run_id": tracker.run_id, "totals": dict(totals),
                    "rollout_restarts": rollouts.restarts, "tracking_uri": tracker.uri}

        def run_eval() -> dict:
            metrics, path = evaluate(cfg, rollouts, services.rewards, val_prompts, val_answers, step, run_dir)
            totals["eval_s"] += metrics["eval/seconds"]
            tracker.log_metrics(metrics, step)
            tracker.log_artifact(path, "eval")
            page = eval_page(path, f"{run_dir.name}: held-out decoding at step {step}")
            if page is not None:
                tracker.log_artifact(page, "pages")
            log.write({"kind": "eval", "step": step, **metrics})
            print(f"rl: eval at step {step}: " + ", ".join(
                f"{mode} acc {metrics[f'eval/{mode}/accuracy']:.3f} act {metrics[f'eval/{mode}/activation']:.2f} "
                f"L_crit {metrics[f'eval/{mode}/L_crit']:.1f}" for mode in cfg.eval.modes), flush=True)
            return metrics

        last_saved = step if resume is not None else -1
        with MetricsLog(run_dir / "metrics.jsonl", step if resume is not None else None) as log:
            if step == 0 and cfg.eval.at_start:
                run_eval()
            while step < cfg.steps:
                t_step = time.perf_counter()
                indices = stream.take(cfg.prompts_per_step)
                records = [train_records[i] for i in indices]
                prompts = [chat_prompt_ids(tokenizer, r[d.prompt_field]) for r in records]

                t0 = time.perf_counter()
                rc = replace(cfg.rollout, seed=step_seed(cfg.rollout.seed, step + 1))
                trajectories = rollouts.generate(prompts, rc)
                rollout_s = time.perf_counter() - t0
                if len(trajectories) != len(prompts) * k:
                    raise RuntimeError(f"{len(trajectories)} trajectories for {len(prompts)} prompts x {k}")

                t0 = time.perf_counter()
                scores = services.rewards.score_batch([
                    RewardItem(t.text, str(records[t.prompt_index][d.answer_field]), t.units, t.finish_reason)
                    for t in trajectories])
                reward_s = time.perf_counter() - t0

                t0 = time.perf_counter()
                rewards = [s.reward for s in scores]
                adv = batch_advantages(rewards, k, cfg.grpo.advantage, cfg.grpo.std_floor)
                groups = [[t.units for t in trajectories[i * k:(i + 1) * k]] for i in range(len(prompts))]
                tries = rl_tries(groups, [adv[i * k:(i + 1) * k] for i in range(len(prompts))],
                                 cfg.learner.row_tokens)
                n_tokens = sum(completion_tokens(t.units) for t in trajectories)
                stats = tree_stats(tries)
                train_tries = tries
                if cfg.grpo.skip_zero_advantage and cfg.grpo.kl_coef == 0:
                    train_tries = [t for t in tries if has_weight(t)]
                rows, learn = [], []
                if train_tries:  # else nothing to learn from: no optimizer step, the weights stay as they are
                    rows = pack_tries(train_tries, cfg.learner.row_tokens)
                    if services.reference is not None:
                        stripped = [strip_row(r) for r in rows]
                        rows = with_reference(stripped, ray.get(services.reference.logprobs.remote(stripped)))
                    learn = [group.train_step(rows, loss="pgrpo", denominator=float(n_tokens), **options)
                             for _ in range(updates)]
                learn_s = time.perf_counter() - t0

                t0 = time.perf_counter()
                update = rollouts.update_weights(group.state_dict()) if learn else None
                sync_s = time.perf_counter() - t0
                step += 1
                step_s = time.perf_counter() - t_step
                generated = sum(t.L_total for t in trajectories)
                for key, value in (("rollout_s", rollout_s), ("reward_s", reward_s), ("learn_s", learn_s),
                                   ("sync_s", sync_s), ("step_s", step_s)):
                    totals[key] += value
                totals["generated_tokens"] += generated

                nonzero = [a for a in adv if a != 0.0]
                metrics = trajectory_metrics(trajectories, scores, "train/")
                metrics.update(learner_metrics(learn, n_tokens, learn_s))
                metrics.update({
                    "adv/mean_abs": _mean([abs(a) for a in adv]),
                    "adv/zero_groups": _mean([float(all(a == 0.0 for a in adv[i * k:(i + 1) * k]))
                                              for i in range(len(prompts))]),
                    "adv/nonzero_share": len(nonzero) / len(adv),
                    "batch/completion_tokens": float(n_tokens),
                    "batch/trie_tokens": float(stats.unique_tokens),
                    "batch/tree_token_ratio": stats.expanded_ratio,
                    "batch/trained_tries": float(len(train_tries)),
                    "batch/rows": float(len(rows)),
                    "time/rollout_s": rollout_s, "time/reward_s": reward_s, "time/learn_s": learn_s,
                    "time/sync_s": sync_s, "time/step_s": step_s,
                    "time/sync_load_s": update.load_s if update is not None else 0.0,
                    "throughput/rollout_tokens_per_s": generated / max(rollout_s, 1e-9),
                    "throughput/step_tokens_per_s": generated / max(step_s, 1e-9),
                    "rollout/restarts": float(rollouts.restarts),
                    "rollout/generated_tokens": float(generated),
                    "data/epoch": float(stream.state.epoch),
                    "data/prompts_seen": float(stream.state.served),
                })
                log.write({"kind": "train", "step": step, **metrics})
                tracker.log_metrics(metrics, step)
                print(f"rl: step {step}/{cfg.steps} reward {metrics['train/reward']:.3f} "
                      f"correct {metrics['train/correct']:.3f} act {metrics['train/activation']:.2f} "
                      f"L_crit {metrics['train/L_crit']:.0f} eta {metrics['train/eta']:.3f} | rollout "
                      f"{rollout_s:.1f}s reward {reward_s:.1f}s learn {learn_s:.1f}s sync {sync_s:.1f}s", flush=True)
                if cfg.save_every and step % cfg.save_every == 0:
                    log.sync()  # the records up to a checkpoint are on disk with it
                    checkpoint.save(group, ckpt_root, step, trainer_state(), cfg.keep_last)
                    last_saved = step
                if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps:
                    run_eval()
                if on_step is not None:
                    on_step(step, metrics)
            if last_saved != step:
                log.sync()
                checkpoint.save(group, ckpt_root, step, trainer_state(), cfg.keep_last)
            final_eval = run_eval() if cfg.eval.at_end else {}
        summary = {
            "steps": step, "wall_s": time.perf_counter() - wall_start, "totals": dict(totals),
            "checkpoint": str(checkpoint.step_dir(ckpt_root, step) / "hf"), "mlflow_run_id": tracker.run_id,
            "tracking_uri": tracker.uri, "rollout_restarts": rollouts.restarts, "eval": final_eval,
        }
        write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        tracker.log_artifact(run_dir / "summary.json")
        status = "FINISHED"
        return summary
    except Stop:
        status = None  # a simulated kill: leave the MLflow run as a killed driver would
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status is not None:
            tracker.finish(status)
        if own_services and services is not None:
            stop_services(services)
        if group is not None:
            group.shutdown()
        if started_ray:
            ray.shutdown()


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config (repeat to merge several, later ones win)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted overrides of config keys, e.g. steps=50 grpo.advantage=std")
    parser.add_argument("--resume", action="store_true",
                        help="continue from RUN_DIR's newest checkpoint (same as resume=auto)")
    parser.add_argument("--show-config", action="store_true", help="print every config key with its help and exit")
    parser.add_argument("--check", action="store_true",
                        help="resolve the config, read the data, start or join Ray, check that every role fits, "
                             "print the plan and exit without training")


def run(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError, describe, load_config

    if args.show_config:
        print(describe(RLConfig))
        return 0
    set_runtime_defaults()
    overrides = list(args.overrides) + (["resume=auto"] if args.resume else [])
    try:
        cfg = load_config(RLConfig, args.config, overrides)
        check_inputs(cfg)
    except (ConfigError, ValueError, OSError) as e:
        print(f"threadweaver rl: {e}", file=sys.stderr)
        return 2
    if args.check:
        return check(cfg)
    summary = train(cfg)
    ev = summary["eval"]
    print(f"rl done: {summary['steps']} steps in {summary['wall_s'] / 60:.1f} min, checkpoint {summary['checkpoint']}")
    for mode in cfg.eval.modes:
        if f"eval/{mode}/accuracy" in ev:
            print(f"held-out {mode}: accuracy {ev[f'eval/{mode}/accuracy']:.3f}, activation "
                  f"{ev[f'eval/{mode}/activation']:.3f}, L_crit {ev[f'eval/{mode}/L_crit']:.1f}, "
                  f"eta {ev[f'eval/{mode}/eta']:.3f}")
    if summary["mlflow_run_id"]:
        print(f"MLflow run {summary['mlflow_run_id']} at {summary['tracking_uri']}")
    return 0


def check(cfg: RLConfig) -> int:
    """``--check``: everything but training (see ``add_arguments``)."""
    import ray

    from cluster.ray_setup import init_ray, plan_text

    try:
        train_records, val_records = _load_data(cfg)
    except (OSError, ValueError) as e:
        print(f"threadweaver rl: {e}", file=sys.stderr)
        return 2
    started = init_ray(cfg.ray, roles(cfg))
    try:
        resources = ray.cluster_resources()
        print(f"rl check: {len(train_records)} training and {len(val_records)} validation records; Ray at "
              f"{ray.get_runtime_context().gcs_address} with {resources.get('CPU', 0):g} CPU, "
              f"{resources.get('GPU', 0):g} GPU; the roles fit:\n{plan_text(roles(cfg))}")
    finally:
        if started:
            ray.shutdown()
    return 0
