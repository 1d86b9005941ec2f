"""Benchmark the weight sync: direct from the learner, by collective broadcast, and through the driver (before).

Three ways of moving the learner's weights into the rollout engines, measured
side by side in one run:

* ``direct``: the learner ranks serialise the buckets and put them in Ray's
  object store themselves (``LearnerGroup.publish_weights``); the driver only
  hands the references to the workers (``RolloutPool.update_weights``).
  Training's default (``rollout.weight_transfer: objects``).
* ``collective``: learner rank 0 broadcasts the buckets over a process group
  that every engine worker joins for the update (``rollout.collective``;
  gloo here, on CPU); the workers load them as they arrive, no object store,
  no disk (``rollout.weight_transfer: collective``; in the tiny RL run the
  driver's own sync with that config).
* ``driver``: the way before issue 16, rebuilt here from the kept parts: the
  driver fetches the full state dict (``LearnerGroup.state_dict``), cuts and
  puts the buckets itself (``rollout.weights.publish_state_dict``), then the
  workers load them the same way.

For each way it reports the sync seconds (median; the learner's or driver's
publishing, or for ``collective`` rank 0's sending, which overlaps the
loading, and the slowest worker's fetch + write + reload, or receive +
load), and the
driver process's resident memory: just before the way's first sync (its
base: what the driver holds without any weights), its peak during a sync
(the kernel's VmHWM, reset before every sync through
``/proc/self/clear_refs``) and its growth over the resident memory just
before the sync.

Each model runs in a fresh driver process of its own (a spawned child; this
process only starts them and prints the table), and in that process every
``direct`` and ``collective`` sync runs before any ``driver`` sync: a ``driver`` sync leaves
about 2.5 times the weights resident in the process after it returns (the
object-store pages it wrote and read stay mapped, counted as shared
resident memory, and the heap keeps what it freed), so a direct sync
measured after one would report those leftovers as its own peak. The large
model is written by a third child, so no driver process ever holds it.

Two models:

1. ``tiny``: the tiny RL config (``experiments/rl_tiny.yaml``) run for
   ``--steps`` P-GRPO steps per way on a freshly initialised tiny model (the
   config starts from an SFT checkpoint, which a bare clone lacks; an
   untrained model writes longer, random responses) with
   ``reward.format_penalty=1`` so that the groups' rewards differ and every
   step learns and syncs. The rollout and reward actors are shared by both
   ways; each way starts its own learner. The sync's share of the step is
   ``time/sync_s / time/step_s`` of each step (the start's sync is not a
   step's).
2. ``large``: a randomly initialised Qwen3-shaped model of about 100M
   parameters (hidden 768, 12 layers, 12 heads, 4 KV heads, MLP 2048,
   vocabulary 32768, tied head; fp32, made with transformers from a config
   in a child process, no download), one learner rank and one rollout worker;
   ``--repeats`` syncs per way (no RL step: on two CPU cores a step of this
   model takes minutes). The same syncs of the tiny model (``tiny ..., syncs
   only``) give the like-for-like comparison: the same driver code, with a
   model 160 times smaller.

The worker's load writes every bucket to its node's local disk before vLLM
reloads from there; on this machine's disk, writing the 384 MiB of the
large model sometimes took ~0.9 s instead of ~0.1 s (measured apart, without
vLLM, with either process owning the buckets), so the load column of the
large model varies between syncs.

Nothing is asserted; timings on a shared machine are noisy, so compare the
rows of one run, and run it alone on the machine (nothing else using the cores):

    .venv/bin/python scripts/bench_weight_sync.py
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

for _name, _value in {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
                      "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
    os.environ.setdefault(_name, _value)

WAYS = ("direct", "collective", "driver")  # every driver sync last (see above)
#: longest wait of a collective sync here (s): the defaults' 300 s, but a benchmark should fail sooner
COLLECTIVE_TIMEOUT_S = 120.0
LARGE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
             intermediate_size=2048, vocab_size=32768, tie_word_embeddings=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--work-dir", type=Path, default=None, help="models, data and runs (default: a temporary dir)")
    g.add_argument("--skip-tiny", action="store_true", help="skip the tiny RL config")
    g.add_argument("--skip-large", action="store_true",
                   help="skip the syncs-only rows (the ~100M-parameter model and the tiny one)")
    g = p.add_argument_group("tiny RL config")
    g.add_argument("--config", default="experiments/rl_tiny.yaml", help="RL config file (default: the tiny one)")
    g.add_argument("--steps", type=int, default=3, help="P-GRPO steps per way (count, default 3)")
    g.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override, repeatable (e.g. prompts_per_step=4)")
    g = p.add_argument_group("large model")
    g.add_argument("--repeats", type=int, default=3, help="syncs per way (count, default 3)")
    g.add_argument("--bucket-mb", type=float, default=64.0, help="bucket size for the large model (MiB, default 64)")
    return p.parse_args()


# --------------------------------------------------------------------------- the driver's memory


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class PeakRSS:
    """This process's resident-memory high-water mark over a block, MiB (Linux: VmHWM, reset on entry)."""

    def __enter__(self) -> "PeakRSS":
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        self.before = _status_kib("VmRSS") / 1024
        return self

    def __exit__(self, *exc) -> None:
        self.peak = _status_kib("VmHWM") / 1024
        self.growth = self.peak - self.before


# --------------------------------------------------------------------------- the two ways


def publish(way: str, group, bucket_mb: float):
    """The learner's weights in the object store, put by the learner (``direct``) or by this process
    (``driver``), or a broadcast from learner rank 0 that the pool's ``update_weights`` joins (``collective``)."""
    from rollout.weights import publish_state_dict

    if way == "direct":
        return group.publish_weights(bucket_mb)
    if way == "collective":
        return group.broadcast(bucket_mb, COLLECTIVE_TIMEOUT_S)
    return publish_state_dict(group.state_dict(), int(bucket_mb * 2**20))


class Recorder:
    """Wraps the driver's sync (``Run.publish_weights`` + ``Rollouts.update_weights``) to publish the ``way``
    way and record each sync's seconds and the driver's peak memory."""

    def __init__(self):
        self.way = "direct"
        self.syncs: list[dict] = []

    def install(self) -> None:
        from rl.driver import Run
        from rl.services import Rollouts

        recorder, update, driver_publish = self, Rollouts.update_weights, Run.publish_weights

        def run_publish(run):
            recorder.peak = PeakRSS().__enter__()
            recorder.start = time.perf_counter()
            if recorder.way == "collective":  # the driver's own sync with rollout.weight_transfer=collective
                return driver_publish(run)
            return publish(recorder.way, run.group, run.cfg.rollout.weight_bucket_mb)

        def rollouts_update(rollouts, weights):
            result = update(rollouts, weights)
            del weights
            recorder.peak.__exit__()
            recorder.syncs.append({"way": recorder.way, "seconds": time.perf_counter() - recorder.start,
                                   "update": result, "before": recorder.peak.before, "peak": recorder.peak.peak,
                                   "growth": recorder.peak.growth})
            return result

        Run.publish_weights = run_publish
        Rollouts.update_weights = rollouts_update


def tiny_rl(args, work: Path) -> list[dict]:
    """``--steps`` P-GRPO steps per way on the tiny RL config; one row per way."""
    import ray

    from cluster.config import load_config
    from rl.driver import RLConfig, train
    from rl.services import start_services, stop_services
    from rl.tracker import NoTracker
    from rollout.ray_init import start_ray
    from rollout.tiny import init_model

    model = work / "tiny"
    if not (model / "config.json").exists():
        init_model(model, seed=0)

    def config(way: str) -> RLConfig:
        run_dir = tempfile.mkdtemp(dir=work, prefix=f"rl_{way}-")  # a fresh run every time (no --resume)
        return load_config(RLConfig, args.config, [
            f"model={model}", f"run_dir={run_dir}", f"data.dir={work / 'data'}", "data.generate=true",
            f"steps={args.steps}", "save_every=0", "keep_last=1", "eval.at_start=false", "eval.every=0",
            "eval.at_end=false", "progress=false", "reward.format_penalty=1.0",
            f"rollout.weight_transfer={'collective' if way == 'collective' else 'objects'}",
            f"rollout.weight_transfer_timeout_s={COLLECTIVE_TIMEOUT_S}", *args.override])

    recorder = Recorder()
    recorder.install()
    steps: dict[str, list[dict]] = {}
    start_ray(None, num_cpus=4, include_dashboard=False)
    try:
        first = config("direct")
        services = start_services(first.rollout, first.reward, first.grpo, first.learner, first.model)
        try:
            for way in WAYS:
                recorder.way = way
                steps[way] = []
                train(config(way), NoTracker(), services=services,
                      on_step=lambda step, metrics, way=way: steps[way].append(metrics))
        finally:
            stop_services(services)
    finally:
        ray.shutdown()
    rows = []
    for way in WAYS:
        syncs = [s for s in recorder.syncs if s["way"] == way]
        shares = [m["time/sync_s"] / m["time/step_s"] for m in steps[way] if m["time/sync_s"] > 0]
        rows.append(row("tiny (rl_tiny.yaml)", way, syncs, shares=shares,
                        step_s=statistics.median(m["time/step_s"] for m in steps[way])))
    return rows


def make_large(out: str) -> None:
    """Write the ~100M-parameter model (see module doc) with the tiny model's tokenizer (in a child process, so
    that this one's memory does not hold it)."""
    import shutil

    import torch
    from transformers import AutoConfig, Qwen3ForCausalLM

    from rollout.tiny import init_model, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tiny = init_model(Path(tmp) / "tiny", seed=0)  # its tokenizer and generation config
        config = AutoConfig.from_pretrained(tiny)
        config.update({**LARGE, "layer_types": ["full_attention"] * LARGE["num_hidden_layers"]})
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).to(torch.float32)
        model.save_pretrained(out)
        load_tokenizer(tiny).save_pretrained(out)
        shutil.copy(tiny / "generation_config.json", Path(out) / "generation_config.json")


def syncs_only(args, work: Path, name: str) -> list[dict]:
    """``--repeats`` syncs per way of model ``work/name`` (``tiny`` or ``large``) from one learner rank to one
    rollout worker, every direct sync first (see the module doc)."""
    import ray

    from rl.learner import LearnerConfig, LearnerGroup
    from rollout.config import RolloutConfig
    from rollout.ray_init import start_ray
    from rollout.tiny import init_model
    from rollout.workers import RolloutPool

    model = work / name
    if not (model / "config.json").exists():
        init_model(model, seed=0)  # the tiny model (the large one is written beforehand, in another process)
    syncs: list[dict] = []
    start_ray(None, num_cpus=2, include_dashboard=False)
    pool = group = None
    try:
        pool = RolloutPool(model, RolloutConfig(workers=1, cpus_per_worker=1, max_context=512))
        group = LearnerGroup(LearnerConfig(ranks=1, cpus_per_rank=1, threads_per_rank=1), model, total_steps=1)
        params = group.info[0]["parameters"]
        for way in WAYS:
            for _ in range(args.repeats):
                with PeakRSS() as peak:
                    start = time.perf_counter()
                    update = pool.update_weights(publish(way, group, args.bucket_mb))
                syncs.append({"way": way, "seconds": time.perf_counter() - start, "update": update,
                              "before": peak.before, "peak": peak.peak, "growth": peak.growth})
    finally:
        if group is not None:
            group.shutdown()
        if pool is not None:
            pool.shutdown()
        ray.shutdown()
    size = f"{params / 1e6:.0f}M" if params >= 1e7 else f"{params / 1e6:.2f}M"
    return [row(f"{name} ({size}), syncs only", way, [s for s in syncs if s["way"] == way]) for way in WAYS]


def row(model: str, way: str, syncs: list[dict], shares: list[float] | None = None,
        step_s: float | None = None) -> dict:
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    return {"model": model, "way": way, "syncs": len(syncs), "MiB": med([s["update"].n_bytes / 2**20 for s in syncs]),
            "sync s": med([s["seconds"] for s in syncs]),
            "publish s": med([s["update"].publish_s for s in syncs]),
            "load s": med([s["update"].load_s for s in syncs]),
            "driver base MiB": syncs[0]["before"] if syncs else float("nan"),
            "driver peak MiB": max((s["peak"] for s in syncs), default=float("nan")),
            "driver growth MiB": max((s["growth"] for s in syncs), default=float("nan")),
            "step s": step_s if step_s is not None else float("nan"),
            "sync share": med(shares) if shares else float("nan")}


def in_child(fn, *args):
    """``fn(*args)`` in a fresh spawned process (its own driver: nothing of this one's memory), its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    args = parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-weight-sync-"))
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    rows = []
    if not args.skip_large and not (work / "large" / "config.json").exists():  # first: a failure costs no engine
        in_child(make_large, str(work / "large"))
    if not args.skip_tiny:
        rows += in_child(tiny_rl, args, work)
    if not args.skip_large:  # the same syncs of both models, each in a driver process of its own
        rows += in_child(syncs_only, args, work, "tiny")
        rows += in_child(syncs_only, args, work, "large")
    cols = ["model", "way", "syncs", "MiB", "sync s", "publish s", "load s", "driver base MiB", "driver peak MiB",
            "driver growth MiB", "step s", "sync share"]
    print(f"\nweight sync, learner -> rollout workers (work dir {work}; loadavg before "
          f"{load_before}, after {Path('/proc/loadavg').read_text().split()[:3]})\n")
    print(f"{cols[0]:<30}{cols[1]:<12}" + "".join(f"{c:>18}" for c in cols[2:]))
    for r in rows:
        cells = "".join(f"{r[c]:>18.3f}" if isinstance(r[c], float) else f"{r[c]:>18}" for c in cols[2:])
        print(f"{r['model']:<30}{r['way']:<12}{cells}")
    print("\nsync s: the driver's wall clock of one sync (median); publish s: the learner's (direct) or the "
          "driver's (driver) cutting, serialising and putting, or learner rank 0's sending (collective, while the "
          "workers load); load s: the slowest worker's fetch, write and reload (or receive and load); driver base: the driver process's resident memory just before the way's first sync; driver peak / "
          "growth: its resident-memory high-water mark during a sync, and its rise over the memory just before "
          "(the largest of the syncs); each model in a fresh driver process, direct syncs first; sync share: time/sync_s over "
          "time/step_s (median over the steps).")


if __name__ == "__main__":
    main()
