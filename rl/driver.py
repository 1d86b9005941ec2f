"""The P-GRPO training loop on Ray (DESIGN sections 6 and 7); ``threadweaver rl`` runs it (``cluster.cmd_rl``).

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
   its advantage (:mod:`rl.step`);
5. packs the tries into rows of at most ``learner.row_tokens`` tokens and runs
   ``grpo.updates_per_batch`` optimizer steps on the DeepSpeed learner ranks
   with the ``"pgrpo"`` loss, normalised by the number of completion tokens of
   the whole batch (one step: on-policy; more: PPO-clipped ratios against the
   rollout's log-probabilities); with ``grpo.kl_coef > 0`` a reference-model
   actor adds the log-probabilities of the starting checkpoint. Groups whose
   advantages are all 0 are not forwarded (``grpo.skip_zero_advantage``), and
   a batch without any non-zero advantage takes no optimizer step and no
   weight sync (``learner/skipped`` = 1);
6. sends the new weights to every rollout worker in buckets and times it:
   the learner ranks put the buckets in Ray's object store themselves
   (``LearnerGroup.publish_weights``) and return only their references,
   which the driver hands to the workers (``RolloutPool.update_weights``);
   the workers fetch the buckets from the learner's object store, so the
   weights never pass through the driver's memory (nor at start, on resume,
   or when a rebuilt rollout pool loads the current weights); with
   ``rollout.weight_transfer: collective`` learner rank 0 broadcasts the
   buckets over a process group that every engine worker joins instead
   (gloo on CPU, NCCL on GPUs; :mod:`rollout.collective`);

   with ``max_staleness = 1`` steps 1-3 of step t+1 run in a background
   thread during step t's learning, on the rollout workers that still hold
   step t-1's weights, and step 6 waits for them; the batch is then one step
   old and learned from with the PPO-clipped ratio against the rollout's
   log-probabilities, and a checkpoint of step t holds the batch of step t+1
   already sampled, so ``--resume`` stays exact (:mod:`rl.overlap`);
7. logs the step's metrics (:mod:`rl.metrics`) to ``RUN_DIR/metrics.jsonl``
   and to the tracker it was given (MLflow: ``cluster.tracking``),
   checkpoints every ``save_every`` steps, and evaluates every ``eval.every``
   steps.

Evaluation (:mod:`rl.evaluation`) decodes held-out prompts greedily on the
same rollout workers, in parallel (spawn/join) and sequential mode, scores
them with the reward actors and logs accuracy, reward, format validity,
activation ratio, ``L_total``, ``L_crit``, ``eta`` and finish reasons per
mode; every decoded trajectory goes to ``RUN_DIR/eval/step_N.jsonl`` and to
the tracker as an artifact, with a viewer page of the first 40
(``eval/step_N.html``, artifact ``pages/``) when the caller passes a page
writer.

Failures: a rollout worker that dies (or whose engine dies) during a
rollout or a weight sync makes the driver rebuild the rollout pool, load the
learner's current weights into it and redo that rollout or sync (at most
``max_rollout_restarts`` times per call: each rollout, weight sync or
evaluation; :mod:`rl.services`); reward actors
are replaced by the reward service itself; a dead learner or driver is
recovered by resuming from the newest complete checkpoint (``--resume``;
:mod:`rl.checkpoint` passes over a damaged one), which restores the step, the
prompt order, the optimizer, scheduler and RNG states, trims
``metrics.jsonl`` to that step (:mod:`rl.metrics_log`) and reopens the same
tracked run. An unreachable tracking server only produces warnings.

Outputs in ``run_dir``: ``config.yaml`` (resolved; ``config_resume_step_N.yaml``
on resume), ``metrics.jsonl``, ``eval/step_N.jsonl``, ``checkpoints/``
(``rl.checkpoint``), ``summary.json``, and the local MLflow store
(``mlflow.db``, ``mlartifacts/``) unless a tracking URI is given.

Several nodes (``rollout.storage``): with ``storage`` set (a folder every node
sees, or a pyarrow/fsspec URI) the checkpoints go to ``STORAGE/checkpoints``
(every learner rank uploads its own shard, the driver writes ``latest``
there, a resume reads from there into each rank's scratch) and the driver
copies its run outputs there at every checkpoint and at the end; ``RUN_DIR``
is then the driver's local copy. The driver never opens a file an actor
wrote. A ``model`` given as a local folder is read by the driver and shipped
to actors on other nodes (``rollout.storage.ship_folder``); a URI is read by
every actor from storage.

The caller starts Ray (or joins a cluster) and builds the tracker; this module
never imports the command layer (``cluster/``).

Usage: ``threadweaver rl --config experiments/rl_tiny.yaml [key.sub=value ...] [--resume]``.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from rewards.config import RewardConfig
from rewards.score import RewardItem, item_tags
from rewards.tag_count import TagTokens
from rl import checkpoint
from rl.checkpoint import Stop  # noqa: F401 - part of this module's API: on_step hooks raise it
from rl.evaluation import MODES, evaluate_heldout
from rl.grpo import GRPOConfig
from rl.learner import LearnerConfig, LearnerGroup
from rl.memory_plan import Plan, PlanConfig, check_plan, make_plan, model_shape
from rl.metrics import StepTimes, step_metrics
from rl.metrics_log import MetricsLog
from rl.services import Placement, Rollouts, Services, start_services, stop_services
from rl.sft_data import TaskData, check_data_config, ensure_task_data
from rl.overlap import Request, RolloutBatch, Scheduler
from rl.step import StepResult, rl_step
from rl.tracker import Tracker, finish_on_error
from rollout.config import RolloutConfig, check_ranges, to_dict
from rollout.files import check_model_dir, check_output_dir, write_text
from rollout.records import read_records
from rollout.storage import Storage, fetch_folder, is_uri, ship_folder
from rollout.units import chat_prompt_ids

@dataclass
class RLDataConfig(TaskData):
    """Training and held-out prompts with their reference answers (the synthetic task's fields: from
    :class:`rl.sft_data.TaskData`)."""

    dir: str = field(default="runs/data/tiny", metadata={"help": "folder holding the train/validation files"})
    train_file: str = field(default="train.jsonl", metadata={
        "help": "training records in dir (.jsonl/.parquet, this project's layout or verl's)"})
    validation_file: str = field(default="validation.jsonl", metadata={
        "help": "held-out records: a file in dir, or an absolute path"})
    prompt_field: str = field(default="prompt", metadata={"help": "record field holding the prompt text"})
    answer_field: str = field(default="answer", metadata={"help": "record field holding the reference answer"})
    generate: bool = field(default=False, metadata={
        "help": "write the synthetic task into dir when its files are missing (same rule as the SFT stage: a "
                "folder made with other settings is an error)"})


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
    """The P-GRPO stage: model, prompts, rollout, reward, objective, learner, evaluation.

    The command's config (``cluster.cmd_rl.RLRunConfig``) adds ``tracking`` and ``ray``.
    """

    model: str | None = field(default=None, metadata={
        "help": "starting checkpoint (Hugging Face folder, tags as single tokens, or a storage URI of one), e.g. "
                "the SFT stage's RUN_DIR/checkpoints/step_N/hf (required; a local folder is read by the driver and "
                "shipped to actors on other nodes)"})
    run_dir: str = field(default="runs/rl", metadata={"help": "output folder of this run"})
    storage: str | None = field(default=None, metadata={
        "help": "where checkpoints and run outputs go so that every node reaches them: a local folder (every "
                "node must see it at the same path) or a pyarrow/fsspec URI (file://, s3://, gs://, hdfs://, ...); "
                "null: RUN_DIR itself (checkpoints in RUN_DIR/checkpoints)"})
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
        "help": "rebuilds of the rollout pool allowed per call (a rollout, a weight sync, an evaluation) after a "
                "worker or engine died (count)", "range": ">= 0"})
    max_staleness: int = field(default=0, metadata={
        "help": "0: strictly on-policy, the rollout of each step waits for the previous step's weights; 1: overlap "
                "rollout and learning, sampling step t+1's batch with the weights of step t-1 while the learner "
                "trains on step t (the loss then uses the PPO-clipped ratio to the rollout's log-probabilities; "
                "rl.overlap) (learner steps)", "range": "[0, 1]"})
    progress: bool = field(default=True, metadata={
        "help": "show a progress bar of the trajectories done in every rollout and held-out evaluation"})
    data: RLDataConfig = field(default_factory=RLDataConfig, metadata={"help": "prompts"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={
        "help": "sampling (n = k samples per prompt, at least 2: set it) and rollout workers"})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "reward weights and service"})
    grpo: GRPOConfig = field(default_factory=GRPOConfig, metadata={"help": "advantages and loss"})
    learner: LearnerConfig = field(default_factory=LearnerConfig, metadata={"help": "DeepSpeed learner ranks"})
    eval: RLEvalConfig = field(default_factory=RLEvalConfig, metadata={"help": "held-out evaluation"})
    plan: PlanConfig = field(default_factory=PlanConfig, metadata={"help": "memory plan checked before training"})

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.rollout.n < 2:
            raise ValueError(f"rollout.n (samples per prompt) must be >= 2 for group advantages, got {self.rollout.n}")


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


# --------------------------------------------------------------------------- inputs


def check_inputs(cfg: RLConfig) -> None:
    """What ``train`` needs, checked before it starts anything: the model, no checkpoints in ``run_dir``
    unless resuming, ``run_dir`` writable (created), the data files (or ``data.dir`` writable when they are
    generated). ValueError with one line naming the key otherwise."""
    check_model(cfg.model)
    if cfg.storage:
        Storage.of(cfg.storage).check("storage")
    if cfg.plan.device_memory_gib > 0:
        check_plan(memory_plan(cfg))
    checkpoint.resume_of_run(cfg.resume, cfg.run_dir, cfg.storage)
    check_output_dir(cfg.run_dir, "run_dir")
    check_data_config(cfg.data)


def check_model(model: str | None) -> None:
    """A Hugging Face folder, or a storage URI holding one (its ``config.json``); ValueError saying what is wrong."""
    if model and is_uri(model):
        try:
            found = Storage.of(model).exists("config.json")
        except ValueError as e:  # the URI's filesystem cannot be opened
            raise ValueError(f"model {e}") from None
        if not found:
            raise ValueError(f"model {model} holds no config.json (not a Hugging Face model folder)")
        return
    check_model_dir(model, "model")


def memory_plan(cfg: RLConfig) -> Plan:
    """Learner ranks, rollout workers and the reference model (KL term) per device (:mod:`rl.memory_plan`)."""
    return make_plan(model_shape(fetch_folder(cfg.model), cfg.plan.architecture), cfg.learner, cfg.plan, cfg.rollout,
                     reference=cfg.grpo.kl_coef > 0)


def load_data(cfg: RLConfig) -> tuple[list[dict], list[dict]]:
    """The training and validation records (the synthetic task written first with ``data.generate``)."""
    d = cfg.data
    data_dir = Path(d.dir)
    if d.generate:
        ensure_task_data(data_dir, d.task, d.sizes, d.seed)
    train, val = read_records(data_dir / d.train_file), read_records(data_dir / d.validation_file)
    for name, records in (("training", train), ("validation", val)):
        bad = [i for i, r in enumerate(records) if not isinstance(r.get(d.prompt_field), str)
               or r.get(d.answer_field) is None]
        if bad:
            raise ValueError(f"{name} records {bad[:5]} lack a string '{d.prompt_field}' or an '{d.answer_field}'")
    if not train:
        raise ValueError(f"no training records in {data_dir / d.train_file}")
    return train, val


# --------------------------------------------------------------------------- the loop


#: ``eval_page(records_file, title) -> page or None``: renders an evaluation's records (``cluster.viewer``)
PageWriter = Callable[[Path, str], "Path | None"]


@dataclass
class Run:
    """What the training loop carries from step to step (one object, instead of closures over locals)."""

    cfg: RLConfig
    tracker: Tracker
    group: Any
    services: Services
    rollouts: Rollouts
    stream: PromptStream
    tokenizer: Any
    train_records: list[dict]
    val_prompts: list[list[int]]
    val_answers: list[str]
    eval_page: PageWriter | None
    totals: Counter
    step: int = 0
    log: MetricsLog | None = None
    #: held while the learner trains: a pool rebuilt during an overlapped rollout fetches the learner's weights
    #: only after that (two threads calling into the ranks at once could interleave their collectives)
    learner_lock: threading.Lock = field(default_factory=threading.Lock)
    reward_tags: TagTokens | None = field(init=False, default=None)
    schedule: Scheduler = field(init=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def checkpoints(self) -> Path | str:
        """The checkpoint root: ``RUN_DIR/checkpoints``, or ``STORAGE/checkpoints`` with a storage."""
        return checkpoint.checkpoints_of(self.cfg.run_dir, self.cfg.storage)

    def __post_init__(self) -> None:
        self.reward_tags = item_tags(self.cfg.reward, self.tokenizer)  # None unless the reward counts by tag
        self.schedule = Scheduler(self.cfg.max_staleness, self.cfg.steps, self.plan, self.produce)

    def trainer_state(self) -> dict:
        return {"data": asdict(self.stream.state), "mlflow_run_id": self.tracker.run_id, "totals": dict(self.totals),
                "rollout_restarts": self.rollouts.restarts, "tracking_uri": self.tracker.uri,
                "overlap": self.schedule.state()}

    def save(self) -> None:
        self.log.sync()  # the records up to a checkpoint are on disk with it
        checkpoint.save(self.group, self.checkpoints, self.step, self.trainer_state(), self.cfg.keep_last)
        checkpoint.store_outputs(self.cfg.run_dir, self.cfg.storage)

    def run_eval(self) -> dict:
        """Decode the held-out prompts in each mode; log the metrics, the records and their page."""
        cfg = self.cfg
        metrics, path = evaluate_heldout(cfg.rollout, cfg.eval.modes, self.rollouts, self.services.rewards,
                                         self.val_prompts, self.val_answers, self.step, self.run_dir,
                                         self.reward_tags)
        self.totals["eval_s"] += metrics["eval/seconds"]
        self.tracker.log_metrics(metrics, self.step)
        self.tracker.log_artifact(path, "eval")
        if self.eval_page is not None:
            page = self.eval_page(path, f"{self.run_dir.name}: held-out decoding at step {self.step}")
            if page is not None:
                self.tracker.log_artifact(page, "pages")
        self.log.write({"kind": "eval", "step": self.step, **metrics})
        print(f"rl: eval at step {self.step}: " + ", ".join(
            f"{mode} acc {metrics[f'eval/{mode}/accuracy']:.3f} act {metrics[f'eval/{mode}/activation']:.2f} "
            f"L_crit {metrics[f'eval/{mode}/L_crit']:.1f}" for mode in cfg.eval.modes), flush=True)
        return metrics

    def publish_weights(self):
        """The learner's current weights as the pool takes them: references to buckets in Ray's object store
        (``rollout.weights``) or a broadcast from rank 0 (``rollout.collective``), per ``rollout.weight_transfer``."""
        return self.group.weights(self.cfg.rollout)

    def plan(self, step: int) -> Request:
        """Take the prompts of ``step`` from the prompt order."""
        indices = self.stream.take(self.cfg.prompts_per_step)
        return Request(step, indices, self.stream.state.epoch, self.stream.state.served)

    def produce(self, request: Request, version: int) -> RolloutBatch:
        """Sample ``request``'s prompts on the rollout workers (holding weights ``version``) and score them."""
        cfg, d = self.cfg, self.cfg.data
        records = [self.train_records[i] for i in request.indices]
        prompts = [chat_prompt_ids(self.tokenizer, r[d.prompt_field]) for r in records]
        restarts = self.rollouts.restarts
        t0 = time.perf_counter()
        trajectories = self.rollouts.generate(prompts, replace(cfg.rollout,
                                                               seed=step_seed(cfg.rollout.seed, request.step)))
        rollout_s = time.perf_counter() - t0
        if len(trajectories) != len(prompts) * cfg.rollout.n:
            raise RuntimeError(f"{len(trajectories)} trajectories for {len(prompts)} prompts x {cfg.rollout.n}")
        t0 = time.perf_counter()
        scores = self.services.rewards.score_batch([
            RewardItem(t.text, str(records[t.prompt_index][d.answer_field]), t.units, t.finish_reason,
                       self.reward_tags) for t in trajectories])
        return RolloutBatch(request, version, trajectories, scores, rollout_s, time.perf_counter() - t0,
                            rebuilt=self.rollouts.restarts != restarts)

    def learn(self, batch: RolloutBatch) -> StepResult:
        """Advantages, tries and the learner's updates on ``batch``; clipped ratios when older weights sampled it."""
        cfg = self.cfg
        reference = self.services.reference_logprobs if self.services.reference is not None else None
        with self.learner_lock:
            return rl_step(batch.trajectories, [s.reward for s in batch.scores], cfg.rollout.n, cfg.grpo,
                           cfg.learner.row_tokens, self.group, reference,
                           off_policy=batch.staleness(self.step + 1) > 0)

    def sync(self, result: StepResult):
        """The learner's new weights to every rollout worker (none when the step took no optimizer step)."""
        return self.rollouts.update_weights(self.publish_weights()) if result.learn else None

    def train_step(self) -> dict:
        """Sample, score, learn, sync the weights, log (in the order of :mod:`rl.overlap`); returns the metrics."""
        cfg, times = self.cfg, StepTimes()
        t_step = time.perf_counter()
        synced = {}

        def timed_sync(result: StepResult):
            t0 = time.perf_counter()
            synced["update"] = self.sync(result)
            times.sync_s = time.perf_counter() - t0

        batch, result = self.schedule.step(self.step + 1, self.learn, timed_sync)
        staleness = batch.staleness(self.step + 1)
        self.step += 1
        trajectories, scores, update = batch.trajectories, batch.scores, synced.get("update")
        times.rollout_s, times.reward_s, times.learn_s = batch.rollout_s, batch.reward_s, result.learn_s
        times.rollout_wait_s = self.schedule.waited_s
        times.step_s = time.perf_counter() - t_step
        times.sync_load_s = update.load_s if update is not None else 0.0
        for key in ("rollout_s", "reward_s", "learn_s", "sync_s", "step_s", "rollout_wait_s"):
            self.totals[key] += getattr(times, key)
        self.totals["generated_tokens"] += sum(t.L_total for t in trajectories)
        metrics = step_metrics(trajectories, scores, result, times, self.rollouts.restarts,
                               batch.request.epoch, batch.request.served, staleness)
        self.log.write({"kind": "train", "step": self.step, **metrics})
        self.tracker.log_metrics(metrics, self.step)
        print(f"rl: step {self.step}/{cfg.steps} reward {metrics['train/reward']:.3f} "
              f"correct {metrics['train/correct']:.3f} act {metrics['train/activation']:.2f} "
              f"L_crit {metrics['train/L_crit']:.0f} eta {metrics['train/eta']:.3f} | rollout "
              f"{times.rollout_s:.1f}s reward {times.reward_s:.1f}s learn {times.learn_s:.1f}s "
              f"sync {times.sync_s:.1f}s" + (f" | staleness {staleness}, waited {times.rollout_wait_s:.1f}s"
                                             if cfg.max_staleness else ""), flush=True)
        return metrics


def _loop(run: Run, on_step: Callable[[int, dict], None] | None, resumed: bool) -> dict:
    """Steps until ``cfg.steps`` with their checkpoints and evaluations; returns the final evaluation's metrics."""
    cfg = run.cfg
    last_saved = run.step if resumed else -1
    with MetricsLog(run.run_dir / "metrics.jsonl", run.step if resumed else None) as run.log:
        try:
            if run.step == 0 and cfg.eval.at_start:
                run.run_eval()
            while run.step < cfg.steps:
                metrics = run.train_step()
                if cfg.save_every and run.step % cfg.save_every == 0:
                    run.save()
                    last_saved = run.step
                if cfg.eval.every and run.step % cfg.eval.every == 0 and run.step < cfg.steps:
                    metrics = {**metrics, **run.run_eval()}  # on_step sees the step's held-out evaluation too
                if on_step is not None:
                    on_step(run.step, metrics)
        finally:
            run.schedule.close()  # between steps no rollout runs ahead: this only ends its thread
        if last_saved != run.step:
            run.save()
        return run.run_eval() if cfg.eval.at_end else {}


def _restore(group, resume: Path | str | None, run_dir: Path, resolved: str) -> tuple[dict, Path]:
    """The trainer state (a fresh one, or the checkpoint's) and the resolved config file of this start."""
    if resume is None:
        return {"data": asdict(PromptState()), "mlflow_run_id": None, "totals": {}, "rollout_restarts": 0,
                "step": 0, "overlap": None}, run_dir / "config.yaml"
    state = checkpoint.load(group, resume)
    config_file = write_text(run_dir / f"config_resume_step_{state['step']}.yaml", resolved)
    print(f"rl: resumed from {resume} at step {state['step']}", flush=True)
    return state, config_file


def train(cfg: RLConfig, tracker: Tracker, on_step: Callable[[int, dict], None] | None = None,
          services: Services | None = None, eval_page: PageWriter | None = None,
          placement: Placement | None = None) -> dict:
    """Run the P-GRPO stage (see module doc) on a started Ray; returns the summary also written to ``summary.json``.

    ``tracker`` receives the parameters, metrics and artifacts (:class:`rl.tracker.Tracker`);
    ``on_step(step, metrics)`` runs after every step (after its checkpoint and
    evaluation; ``metrics`` holds the evaluation's ``eval/...`` values when one
    ran at that step; the final one, after the last step, is the summary's);
    raising :class:`rl.checkpoint.Stop` there ends the run on the spot, as a
    killed driver would (no final checkpoint, the tracked run left
    open). ``services`` reuses running rollout/reward actors (see
    :class:`rl.services.Services`); ``eval_page`` renders each evaluation's
    records as a page that is logged under ``pages/``; ``placement`` puts each role's actors into their
    placement group bundles (:data:`rl.services.Placement`, reserved by the caller).
    """
    from rollout.tiny import load_tokenizer  # lazy: transformers takes seconds to import; --show-config needs none

    wall_start = time.perf_counter()
    check_inputs(cfg)
    run_dir = Path(cfg.run_dir)
    checkpoints = checkpoint.checkpoints_of(cfg.run_dir, cfg.storage)
    resume = checkpoint.resume_of_run(cfg.resume, cfg.run_dir, cfg.storage)
    resolved = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if resume is None:
        write_text(run_dir / "config.yaml", resolved)
    else:
        checkpoint.fetch_metrics(cfg.run_dir, cfg.storage)
    tokenizer = load_tokenizer(fetch_folder(cfg.model))  # a URI: downloaded into the driver's scratch once
    train_records, val_records = load_data(cfg)
    val_chosen = val_records[:cfg.eval.prompts]
    own_services = services is None
    group = None
    try:
        placement = placement or {}
        model = ship_folder(cfg.model)  # what actors read: a URI, or a local folder shipped to other nodes
        group = LearnerGroup(cfg.learner, model, total_steps=cfg.steps * cfg.grpo.updates_per_batch,
                             actor_options=placement.get("learner", ()))
        state, config_file = _restore(group, resume, run_dir, resolved)
        run_id = tracker.start(to_dict(cfg, flat=True), run_id=state["mlflow_run_id"],
                               tags={"stage": "rl", "resumed_from_step": str(state["step"])} if resume
                               else {"stage": "rl"})
        tracker.log_artifact(config_file)
        if run_id is not None:
            print(f"rl: MLflow run {run_id} at {tracker.uri}", flush=True)
        if services is None:
            services = start_services(cfg.rollout, cfg.reward, cfg.grpo, cfg.learner, model, placement)
        learner_lock = threading.Lock()

        def learner_weights():  # what a rebuilt rollout pool loads (the learner's current weights)
            return group.weights(cfg.rollout, learner_lock)

        run = Run(cfg, tracker, group, services,
                  Rollouts(services, model, cfg.rollout, cfg.max_rollout_restarts, learner_weights,
                           placement.get("rollout", ()) if own_services else (), progress=cfg.progress),
                  PromptStream(len(train_records), cfg.seed, PromptState(**state["data"])), tokenizer, train_records,
                  [chat_prompt_ids(tokenizer, r[cfg.data.prompt_field]) for r in val_chosen],
                  [str(r[cfg.data.answer_field]) for r in val_chosen], eval_page, Counter(state["totals"]),
                  step=state["step"], learner_lock=learner_lock)
        run.rollouts.restarts = int(state["rollout_restarts"])
        run.schedule.restore(state.get("overlap"))  # the next step's batch, sampled before the checkpoint
        if resume is not None or not own_services:
            run.rollouts.update_weights(run.publish_weights())  # the pool holds other weights than the learner
        final_eval = _loop(run, on_step, resumed=resume is not None)
        summary = {
            "steps": run.step, "wall_s": time.perf_counter() - wall_start, "totals": dict(run.totals),
            "checkpoint": str(Storage.of(checkpoint.step_dir(checkpoints, run.step)).child("hf").location),
            "mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri, "rollout_restarts": run.rollouts.restarts,
            "eval": final_eval,
        }
        write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        checkpoint.store_outputs(cfg.run_dir, cfg.storage)
        tracker.log_artifact(run_dir / "summary.json")
        tracker.finish("FINISHED")
        return summary
    except BaseException as e:
        finish_on_error(tracker, e)
        raise
    finally:
        if own_services and services is not None:
            stop_services(services)
        if group is not None:
            group.shutdown()
