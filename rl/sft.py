"""``threadweaver sft``: supervised warm start on trie-packed units (DESIGN sections 5 and 7).

What it really does:

1. takes the model from ``model.path``, or writes a fresh tiny model into
   ``RUN_DIR/init_model`` (``rollout.tiny.init_model``);
2. reads the training and validation records (generating the synthetic task
   into ``data.dir`` first when ``data.generate`` and the files are missing);
3. replays every training response into units -- the orchestrator's exact
   requests for the ``parallel`` layout, one flattened causal unit for the
   ``sequential`` baseline -- and builds one trie per record
   (:mod:`rl.sft_data`);
4. for ``steps`` optimizer steps: takes tries in a seeded, per-epoch shuffled
   order until ``tokens_per_step`` trie tokens are reached, packs them into
   rows of at most ``learner.row_tokens`` tokens and trains the ``"sft"``
   loss (mean NLL over every target token of the batch) on the DeepSpeed
   learner ranks (:mod:`rl.learner`);
5. every ``eval.every`` steps and at the end, decodes the validation prompts
   greedily with the spawn/join orchestrator on vLLM (spawning off for the
   sequential layout) and reports accuracy, format-valid and parallel rates,
   ``L_total``, ``L_crit``, ``eta`` (:mod:`rl.sft_eval`);
6. saves checkpoints every ``save_every`` steps and at the end
   (:mod:`rl.checkpoint`): Hugging Face weights vLLM loads, plus optimizer,
   scheduler, RNG and data position. ``resume=auto`` continues from the
   newest complete one exactly where it stopped (a damaged one is passed
   over), with ``metrics.jsonl`` trimmed to its step (:mod:`rl.metrics_log`).

The sequential baseline sees the same records, steps and token budget per
step (so the same number of tokens); since its examples are shorter it sees
more of them. ``train_s`` counts the training loop only (batching and
optimizer steps), not data preparation, evaluation or checkpoint writing.

Outputs in ``run_dir``: ``config.yaml``, ``metrics.jsonl`` (one line per step
and per evaluation), ``eval/step_N.jsonl`` (every decoded validation
response), ``checkpoints/``, ``final`` (a link to the last checkpoint; its
``hf/`` folder is what vLLM and the RL stage load), ``summary.json``.

With ``storage`` set (a folder every node sees, or a pyarrow/fsspec URI;
``rollout.storage``), the checkpoints go to ``STORAGE/checkpoints`` instead
(every learner rank uploads its own files, ``rl.checkpoint``), there is no
``final`` link (the summary's ``checkpoint`` names the last one's ``hf/`` in
storage), the run outputs above are copied there after every checkpoint and
at the end, and ``resume=auto`` continues from storage, taking
``metrics.jsonl`` from there when RUN_DIR lacks it (a new driver machine).
The model, a local folder, is read by the driver and shipped to actors on
other nodes (``rollout.storage.ship_folder``).

Metrics go to the tracker the caller passes (:mod:`rl.tracker`) as they happen:
``train/...`` every step, ``eval/...`` at every evaluation, the parameters at
the start; its run id is saved in each checkpoint, so ``resume=auto`` reopens
the same run.

The caller starts Ray (or joins a cluster) and builds the tracker:
``threadweaver sft`` does (``cluster.cmd_sft``); this module never imports the
command layer.

Usage: ``threadweaver sft --config experiments/sft_tiny.yaml [key.sub=value ...]``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import yaml

from rl import checkpoint
from rl.checkpoint import Stop  # noqa: F401 - part of this module's API: on_step hooks raise it
from rl.learner import LearnerConfig, LearnerGroup
from rl.memory_plan import ModelShape, Plan, PlanConfig, check_plan, make_plan, model_shape
from rl.metrics_log import MetricsLog
from rl.sft_data import StreamState, TaskData, TrieStream, check_data_config, ensure_task_data, timed_build
from rl.sft_eval import EvalConfig, Evaluator, records_to_dicts
from rl.tracker import NoTracker, Tracker, finish_on_error
from rl.trie import pack_tries, tree_stats
from rollout.config import check_ranges, to_dict
from rollout.files import atomic_write, check_model_dir, check_output_dir, write_text
from rollout.records import read_records
from rollout.storage import Storage, ship_folder


@dataclass
class ModelConfig:
    """The model to fine-tune: a Hugging Face directory, or a fresh tiny model."""

    path: str | None = field(default=None, metadata={"help": "model directory (HF format, tags as single tokens); "
                                                             "null: write a fresh tiny model into RUN_DIR/init_model"})
    hidden_size: int = field(default=128, metadata={
        "help": "tiny model: width of the residual stream", "range": ">= 1"})
    num_layers: int = field(default=3, metadata={"help": "tiny model: transformer layers", "range": ">= 1"})
    num_heads: int = field(default=4, metadata={
        "help": "tiny model: attention heads (head size hidden/heads)", "range": ">= 1"})
    num_kv_heads: int = field(default=2, metadata={"help": "tiny model: key/value heads", "range": ">= 1"})
    intermediate_size: int = field(default=384, metadata={"help": "tiny model: MLP width", "range": ">= 1"})
    seed: int = field(default=0, metadata={"help": "tiny model: seed of the initial weights", "range": ">= 0"})

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class DataConfig(TaskData):
    """Training and validation records, and how responses become units (the synthetic task's fields: from
    :class:`rl.sft_data.TaskData`)."""

    dir: str = field(default="runs/data/tiny", metadata={"help": "folder holding the train/validation files"})
    train_file: str = field(default="train.jsonl", metadata={
        "help": "training records in dir (.jsonl/.parquet, this project's layout or verl's)"})
    validation_file: str = field(default="validation.jsonl", metadata={
        "help": "validation records: a file in dir, or an absolute path"})
    prompt_field: str = field(default="prompt", metadata={"help": "record field holding the prompt text"})
    response_field: str = field(default="response_parallel", metadata={
        "help": "record field holding the reference response (parallel format; flattened for the sequential "
                "layout)"})
    answer_field: str = field(default="answer", metadata={"help": "record field holding the reference answer"})
    layout: Literal["parallel", "sequential"] = field(default="parallel", metadata={
        "help": "parallel: the orchestrator's units (trie-packed); sequential: blocks flattened, one causal unit"})
    sequential_share: float = field(default=0.0, metadata={
        "help": "parallel layout: share of training records (fixed by a hash of the prompt) trained flattened, "
                "so the model can answer either way and RL can choose (0-1)", "range": "[0, 1]"})
    generate: bool = field(default=True, metadata={
        "help": "write the synthetic task into dir when its files are missing"})


@dataclass
class SFTConfig:
    """The SFT stage: model, data, learner, schedule length, evaluation, checkpoints.

    The command's config (``cluster.cmd_sft.SFTRunConfig``) adds ``ray``.
    """

    run_dir: str = field(default="runs/sft", metadata={"help": "output folder of this run"})
    storage: str | None = field(default=None, metadata={
        "help": "where checkpoints and run outputs go so that every node reaches them: a local folder (every "
                "node must see it at the same path) or a pyarrow/fsspec URI (file://, s3://, gs://, hdfs://, ...); "
                "null: RUN_DIR itself (checkpoints in RUN_DIR/checkpoints)"})
    steps: int = field(default=1000, metadata={
        "help": "optimizer steps (also the learning-rate schedule length)", "range": ">= 1"})
    tokens_per_step: int = field(default=8192, metadata={"help": "trie tokens per optimizer step, the global "
                                                                 "batch (tokens)", "range": ">= 1"})
    seed: int = field(default=0, metadata={"help": "seed of the data order", "range": ">= 0"})
    save_every: int = field(default=0, metadata={
        "help": "checkpoint every this many steps (0: only at the end)", "range": ">= 0"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept on disk (0: all)", "range": ">= 0"})
    resume: str | None = field(default=None, metadata={
        "help": "'auto': continue from RUN_DIR's newest checkpoint if any; a path: from that checkpoint; "
                "null: start fresh (refused when RUN_DIR already has checkpoints)"})
    progress: bool = field(default=True, metadata={
        "help": "show a progress bar (false: a log line every 5% of the steps)"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data"})
    learner: LearnerConfig = field(default_factory=LearnerConfig, metadata={"help": "learner"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "held-out evaluation"})
    plan: PlanConfig = field(default_factory=PlanConfig, metadata={"help": "memory plan checked before training"})

    def __post_init__(self) -> None:
        check_ranges(self)


def prepare_model(cfg: ModelConfig, run_dir: Path) -> Path:
    if cfg.path is not None:
        path = Path(cfg.path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model.path {path} holds no config.json")
        return path
    from rollout.tiny import init_model  # lazy: transformers takes seconds to import

    path = run_dir / "init_model"
    if (path / "config.json").exists():
        return path
    return init_model(path, seed=cfg.seed, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                      num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                      intermediate_size=cfg.intermediate_size)


def prepare_data(cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    data_dir = Path(cfg.dir)
    if cfg.generate:
        ensure_task_data(data_dir, cfg.task, cfg.sizes, cfg.seed)
    return read_records(data_dir / cfg.train_file), read_records(data_dir / cfg.validation_file)


def check_inputs(cfg: SFTConfig) -> None:
    """What ``train`` needs, checked before it starts anything: the model (or the tiny model's sizes), no
    checkpoints in ``run_dir`` unless resuming, ``run_dir`` writable (created), the data files (or ``data.dir``
    writable when they are generated). ValueError with one line naming the key otherwise."""
    if cfg.model.path is not None:
        check_model_dir(cfg.model.path, "model.path")
    plan = memory_plan(cfg) if cfg.model.path is None or cfg.plan.device_memory_gib > 0 else None
    if plan is not None:  # (building the tiny model's plan also checks its sizes)
        check_plan(plan)
    if cfg.storage:
        Storage.of(cfg.storage).check("storage")
    checkpoint.resume_of_run(cfg.resume, cfg.run_dir, cfg.storage)
    check_output_dir(cfg.run_dir, "run_dir")
    check_data_config(cfg.data)


def memory_plan(cfg: SFTConfig) -> Plan:
    """The learner's memory plan (:mod:`rl.memory_plan`); the tiny model's shape when ``model.path`` is null."""
    if cfg.model.path is not None:
        return make_plan(model_shape(cfg.model.path, cfg.plan.architecture), cfg.learner, cfg.plan)
    from rollout.tiny import build_tokenizer, model_config  # lazy: transformers takes seconds to import

    m = cfg.model
    config = model_config(build_tokenizer(), m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads,
                          m.intermediate_size)
    return make_plan(ModelShape.from_config(config.to_dict()), cfg.learner, cfg.plan)


def build_training_tries(cfg: SFTConfig, tokenizer, train_records: list[dict]) -> tuple[list, dict]:
    """One trie per training record (units replayed as the orchestrator decodes them), and their statistics."""
    tries, build_s = timed_build(train_records, tokenizer, cfg.data.layout, cfg.data.prompt_field,
                                 cfg.data.response_field, "replay + tries", cfg.progress,
                                 cfg.data.sequential_share if cfg.data.layout == "parallel" else 0.0,
                                 max_tokens=cfg.learner.row_tokens)
    stats = tree_stats(tries)
    too_long = max(len(t) for t in tries)
    if too_long > cfg.learner.row_tokens:
        raise ValueError(f"a training example takes {too_long} trie tokens, more than learner.row_tokens="
                         f"{cfg.learner.row_tokens}")
    data_info = {"train_records": len(train_records), "trie_tokens_per_record": stats.unique_tokens / len(tries),
                 "expanded_tokens_per_record": stats.expanded_tokens / len(tries),
                 "targets_per_record": stats.target_tokens / len(tries), "build_s": build_s}
    print(f"sft: {len(tries)} training records ({cfg.data.layout} layout), "
          f"{data_info['trie_tokens_per_record']:.1f} trie tokens each, built in {build_s:.1f} s", flush=True)
    return tries, data_info


@dataclass
class SFTRun:
    """What the training loop carries from step to step (one object, instead of closures over locals)."""

    cfg: SFTConfig
    group: Any
    stream: TrieStream
    evaluator: Evaluator | None
    step: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0
    tokens_seen: float = 0.0
    last_eval: dict = field(default_factory=dict)
    log: MetricsLog | None = None
    tracker: Tracker = field(default_factory=NoTracker)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def checkpoints(self) -> Path | str:
        """The checkpoint root: ``RUN_DIR/checkpoints``, or ``STORAGE/checkpoints`` with a storage."""
        return checkpoint.checkpoints_of(self.cfg.run_dir, self.cfg.storage)

    def trainer_state(self) -> dict:
        return {"train_s": self.train_s, "eval_s": self.eval_s, "tokens_seen": self.tokens_seen,
                "data": vars(self.stream.state).copy(), "layout": self.cfg.data.layout,
                "mlflow_run_id": self.tracker.run_id}

    def save(self) -> None:
        self.log.sync()  # the records up to a checkpoint are on disk with it
        checkpoint.save(self.group, self.checkpoints, self.step, self.trainer_state(), self.cfg.keep_last)
        checkpoint.store_outputs(self.run_dir, self.cfg.storage)

    def run_eval(self) -> dict:
        """Decode the validation prompts with the current weights; write and log the records and metrics."""
        metrics, records = self.evaluator(self.group.weights(self.cfg.eval.rollout))
        self.eval_s += metrics["seconds"]
        (self.run_dir / "eval").mkdir(exist_ok=True)
        with atomic_write(self.run_dir / "eval" / f"step_{self.step:08d}.jsonl") as f:
            for r in records_to_dicts(records):
                f.write(json.dumps(r) + "\n")
        self.log.write({"kind": "eval", "step": self.step, "train_s": self.train_s, **metrics})
        self.tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, self.step)
        self.last_eval = metrics
        return metrics

    def train_step(self) -> dict:
        """One optimizer step on the next ``tokens_per_step`` trie tokens; returns its metrics (also logged)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        batch = self.stream.next_batch(cfg.tokens_per_step)
        rows = pack_tries(batch, cfg.learner.row_tokens)
        metrics = self.group.train_step(rows, loss="sft")
        self.train_s += time.perf_counter() - t0
        self.tokens_seen += metrics["tokens"]
        self.step += 1
        metrics.update(step=self.step, examples=len(batch), rows=len(rows), train_s=self.train_s,
                       examples_seen=self.stream.state.served, tokens_seen=self.tokens_seen,
                       token_accuracy=metrics.get("correct", 0.0) / max(1.0, metrics["targets"]))
        self.log.write({"kind": "train", **metrics})
        self.tracker.log_metrics({f"train/{k}": v for k, v in metrics.items() if k != "step"}, self.step)
        return metrics

    def show_progress(self, metrics: dict, bar) -> None:
        """Update the progress bar, or print a log line every 5% of the steps."""
        cfg, last_eval = self.cfg, self.last_eval
        if bar is not None:
            post = {"loss": f"{metrics['loss']:.3f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
            if last_eval:
                post["acc"] = f"{last_eval['accuracy']:.2f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        elif self.step % max(1, cfg.steps // 20) == 0 or self.step == cfg.steps:
            acc = f" held-out acc {last_eval['accuracy']:.3f}" if last_eval else ""
            print(f"sft {cfg.data.layout}: step {self.step}/{cfg.steps} loss {metrics['loss']:.3f} "
                  f"{metrics['tokens_per_s']:.0f} tok/s, {self.train_s / 60:.1f} min{acc}", flush=True)


def _loop(run: SFTRun, on_step: Callable[[int, dict], None] | None, resumed: bool) -> dict:
    """Steps until ``cfg.steps`` with their checkpoints and evaluations; the final checkpoint, the ``final``
    link (without a storage) and the final evaluation. Returns the final evaluation's metrics."""
    cfg = run.cfg
    last_saved = run.step if resumed else -1
    bar = None
    if cfg.progress:
        from tqdm import tqdm  # lazy: only with a progress bar

        bar = tqdm(total=cfg.steps, initial=run.step, desc=f"sft {cfg.data.layout}", unit="step")
    with MetricsLog(run.run_dir / "metrics.jsonl", run.step if resumed else None) as run.log:
        while run.step < cfg.steps:
            metrics = run.train_step()
            if cfg.save_every and run.step % cfg.save_every == 0:
                run.save()
                last_saved = run.step
            if cfg.eval.every and run.step % cfg.eval.every == 0 and run.step < cfg.steps:
                run.run_eval()
            run.show_progress(metrics, bar)
            if on_step is not None:
                on_step(run.step, metrics)
        if bar is not None:
            bar.close()
        if last_saved != run.step:
            run.save()
        if not cfg.storage:
            final = run.run_dir / "final"
            if final.is_symlink() or final.exists():
                final.unlink()
            # a link relative to the run folder, whether run_dir is relative or absolute
            final.symlink_to(Path("checkpoints") / checkpoint.step_name(run.step), target_is_directory=True)
        return run.run_eval() if cfg.eval.at_end else {}


def train(cfg: SFTConfig, on_step: Callable[[int, dict], None] | None = None,
          tracker: Tracker | None = None, placement: Mapping[str, Sequence[Mapping]] | None = None) -> dict:
    """Run the SFT stage (see module doc) on a started Ray; returns the summary also written to ``summary.json``.

    ``on_step(step, metrics)`` is called after every optimizer step (and
    after that step's checkpoint); raising :class:`Stop` in it ends the run
    on the spot, without a final checkpoint or evaluation (the tracked run is
    left open, as a killed process would). ``tracker`` (none: no tracking)
    receives the parameters and metrics and is closed at the end. ``placement`` maps ``learner`` and ``eval``
    to their actors' extra Ray ``.options`` (placement group bundles reserved by the caller).
    """
    from rollout.tiny import load_tokenizer  # lazy: transformers takes seconds to import; --show-config needs none

    wall_start = time.perf_counter()
    check_inputs(cfg)
    run_dir = Path(cfg.run_dir)
    resume = checkpoint.resume_of_run(cfg.resume, run_dir, cfg.storage)
    write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if resume is not None:
        checkpoint.fetch_metrics(run_dir, cfg.storage)
    model_dir = prepare_model(cfg.model, run_dir)
    tokenizer = load_tokenizer(model_dir)
    train_records, val_records = prepare_data(cfg.data)
    tries, data_info = build_training_tries(cfg, tokenizer, train_records)
    group = None
    evaluator = None
    tracker = tracker or NoTracker()
    try:
        placement = placement or {}
        shipped = ship_folder(model_dir)  # what actors read: the folder, or its files shipped to other nodes
        group = LearnerGroup(cfg.learner, shipped, total_steps=cfg.steps, actor_options=placement.get("learner", ()))
        state = {"step": 0, "train_s": 0.0, "eval_s": 0.0, "tokens_seen": 0.0, "data": vars(StreamState())}
        if resume is not None:
            state = checkpoint.load(group, resume)
            print(f"sft: resumed from {resume} at step {state['step']}", flush=True)
        run_id = tracker.start(to_dict(cfg, flat=True), run_id=state.get("mlflow_run_id"),
                               tags={"stage": "sft", "layout": cfg.data.layout})
        if run_id is not None:
            print(f"sft: MLflow run {run_id} at {tracker.uri}", flush=True)
        if cfg.eval.every or cfg.eval.at_end:
            evaluator = Evaluator(cfg.eval, model_dir, tokenizer, val_records,
                                  sequential=cfg.data.layout == "sequential", prompt_field=cfg.data.prompt_field,
                                  answer_field=cfg.data.answer_field, actor_options=placement.get("eval", ()))
        run = SFTRun(cfg, group, TrieStream(tries, cfg.seed, StreamState(**state["data"])), evaluator,
                     step=state["step"], train_s=state["train_s"], eval_s=state["eval_s"],
                     tokens_seen=state["tokens_seen"], tracker=tracker)
        final_eval = _loop(run, on_step, resumed=resume is not None)
        summary = {
            "layout": cfg.data.layout, "steps": run.step, "train_s": run.train_s, "eval_s": run.eval_s,
            "wall_s": time.perf_counter() - wall_start, "tokens_seen": run.tokens_seen,
            "examples_seen": run.stream.state.served, "epochs": run.stream.state.served / len(tries),
            "checkpoint": str(Storage.of(checkpoint.step_dir(run.checkpoints, run.step)).child("hf").location)
            if cfg.storage else str(run_dir / "final" / "hf"), "data": data_info,
            "eval": final_eval, "mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri,
        }
        write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        checkpoint.store_outputs(run_dir, cfg.storage)
        tracker.log_artifact(run_dir / "summary.json")
        tracker.finish("FINISHED")
        return summary
    except BaseException as e:
        finish_on_error(tracker, e)
        raise
    finally:
        if evaluator is not None:
            evaluator.close()
        if group is not None:
            group.shutdown()
