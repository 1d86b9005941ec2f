"""Rollout overlapped with learning (``rl.max_staleness``) against the strictly on-policy loop, side by side.

One Ray simulated cluster (``ray.cluster_utils.Cluster``: raylets on this
machine) with a head that offers no CPUs, a "rollout node" (custom resource
``rollout_node``: the vLLM rollout worker and the reward actor) and a
"learner node" (``learner_node``: the DeepSpeed rank); each role is pinned to
its node through its actors' custom resources. The tiny RL config
(``experiments/rl_tiny.yaml``) then runs twice on the same rollout and
reward actors, ``max_staleness=0`` and ``1``, from the same starting
weights, with the same prompts and rollout seeds; the table gives, per run,
the mean phase times of steps 2..N (step 1 cannot overlap), the seconds the
learner waited for rollouts, the held-out reward at the end, and the ratio
spread of the stale batches.

Without ``--model`` the model is a freshly initialised tiny one (no trained
SFT checkpoint exists in a fresh clone). It never answers correctly, so the
runs reward format validity (``reward.format_penalty=1``, as the driver's
integration test does), and its random output mostly breaks the format in
every sample, so most groups have no advantage; ``grpo.skip_zero_advantage=false``
makes the learner forward, backward and step on every batch anyway, so each
step costs the learner what a trained model's batch would. The held-out
reward is then a format score, and its difference between the two runs says
little over so few steps. Responses are capped at 256 tokens (``rollout.max_tokens``)
to keep the run short.

For a held-out reward that means something, start from a briefly SFT-trained
tiny model, on the task it was trained on (``sft_tiny.yaml``'s task: 2-digit
second factors, numbers written least-significant digit first), and reward
correctness only (``--format-penalty 0``; ``--eval-prompts`` up to the 50
validation records); each command is one line:

  threadweaver sft --config experiments/sft_tiny.yaml steps=450 save_every=0 run_dir=runs/sft_brief
      data.dir=runs/data/sft_brief data.train_size=4000 eval.every=0 eval.prompts=50
  python scripts/bench_overlap.py --model runs/sft_brief/final/hf --format-penalty 0 --eval-prompts 50
      --override data.task.b_digits=2 data.task.number_order=reversed

(the full ``sft_tiny.yaml`` run, 1100 steps in 8.2 min, gives ``runs/sft_tiny/final/hf``;
the 450-step one above was not timed). A model trained on another task needs
that task's data: ``--override data.dir=ITS_DATA data.generate=false``, and
the RL limits it needs (e.g. ``rollout.max_tokens=512 rollout.max_context=768
learner.row_tokens=4096`` for 4-thread problems).
``grpo.skip_zero_advantage`` stays false, so every step costs the learner the
same whether or not a group's answers all agree.

On one machine both "nodes" share its cores: the overlap can only hide what
the cores can run at the same time (here the rollout engine and the learner
each want a core). Run it alone on the machine and read ``/proc/loadavg``,
printed before and after.

  python scripts/bench_overlap.py                     # 4 steps of 4 prompts x 8 samples, each setting
  python scripts/bench_overlap.py --steps 6 --model runs/sft_tiny/final/hf --format-penalty 0
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

for _name, _value in {"VLLM_CPU_KVCACHE_SPACE": "1", "DS_ACCELERATOR": "cpu", "MLFLOW_DISABLE_TELEMETRY": "true",
                      "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_name, _value)

#: per role, the extra Ray options that pin its actors to their simulated node
PLACEMENT = {"rollout": [{"resources": {"rollout_node": 1}}], "reward": [{"resources": {"rollout_node": 1}}],
             "learner": [{"resources": {"learner_node": 1}}]}


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages of this machine."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def config(args, work: Path, model: Path, staleness: int):
    from cluster.cmd_rl import RLRunConfig
    from cluster.config import load_config

    run = work / f"staleness_{staleness}"
    overrides = [
        f"model={model}", f"run_dir={run}", f"data.dir={work / 'data'}", "data.generate=true",
        "data.train_size=200", "data.validation_size=50", "data.test_size=4",
        f"steps={args.steps}", f"prompts_per_step={args.prompts_per_step}", f"max_staleness={staleness}",
        "grpo.skip_zero_advantage=false", "rollout.max_tokens=256", "rollout.max_context=512",
        "save_every=0", "keep_last=1", "progress=false", f"reward.format_penalty={args.format_penalty}",
        "reward.num_actors=1", "eval.at_start=false", "eval.every=0", "eval.at_end=true",
        f"eval.prompts={args.eval_prompts}", "eval.modes=[parallel]", "tracking.experiment=bench_overlap",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
    ]
    return load_config(RLRunConfig, ROOT / "experiments" / "rl_tiny.yaml", overrides + args.override)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int, default=4, help="training steps of each run (count; step 1 never overlaps)")
    g.add_argument("--prompts-per-step", type=int, default=4, help="prompts per step, rollout.n samples each")
    g.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts decoded at the end (count)")
    g.add_argument("--model", type=Path, default=None,
                   help="starting checkpoint (Hugging Face folder); default: a fresh tiny model (seed 0)")
    g.add_argument("--format-penalty", type=float, default=1.0,
                   help="reward.format_penalty (reward units): the signal of an untrained model")
    g.add_argument("--override", nargs="*", default=[], help="more dotted config overrides (key=value)")
    g = p.add_argument_group("simulated cluster")
    g.add_argument("--rollout-cpus", type=int, default=2, help="CPUs of the rollout node (worker + reward actor)")
    g.add_argument("--learner-cpus", type=int, default=1, help="CPUs of the learner node (one rank)")
    args = p.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from cluster.tracking import Tracker
    from rl import driver
    from rl.services import start_services, stop_services
    from rollout.config import set_runtime_defaults
    from rollout.tiny import init_model

    set_runtime_defaults()
    work = Path(tempfile.mkdtemp(prefix="bench_overlap_"))
    model = args.model.resolve() if args.model else init_model(work / "model", seed=0)
    cfgs = [config(args, work, model, s) for s in (0, 1)]
    print(f"load average before: {loadavg()}; work folder {work}", flush=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    cluster.add_node(num_cpus=args.rollout_cpus, resources={"rollout_node": 10})
    cluster.add_node(num_cpus=args.learner_cpus, resources={"learner_node": 10})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    results = []
    try:
        c0 = cfgs[0]
        services = start_services(c0.rollout, c0.reward, c0.grpo, c0.learner, str(model), PLACEMENT)
        try:
            for cfg in cfgs:  # the pool gets the starting weights again at the start of each run
                summary = driver.train(cfg, Tracker(cfg.tracking, cfg.run_dir), services=services,
                                       placement=PLACEMENT)
                results.append((cfg, summary))
        finally:
            stop_services(services)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"load average after: {loadavg()}")
    print(table(results))
    return 0


def table(results) -> str:
    import json

    keys = [("time/step_s", "step s"), ("time/rollout_s", "rollout s"), ("time/reward_s", "reward s"),
            ("time/learn_s", "learn s"), ("time/sync_s", "sync s"), ("time/rollout_wait_s", "waited s"),
            ("ratio/absdev_mean", "|ratio-1|"), ("loss/clip_frac", "clipped")]
    head = f"{'max_staleness':>13} " + " ".join(f"{label:>10}" for _, label in keys) + f" {'held-out reward':>16}"
    lines = [f"mean over steps 2..N (per-step metrics of RUN_DIR/metrics.jsonl)", head]
    step_s = []
    for cfg, summary in results:
        rows = [json.loads(x) for x in open(Path(cfg.run_dir) / "metrics.jsonl")]
        steps = [r for r in rows if r["kind"] == "train" and r["step"] >= 2]
        means = {k: sum(r[k] for r in steps) / len(steps) for k, _ in keys}
        step_s.append(means["time/step_s"])
        reward = summary["eval"].get("eval/parallel/reward", float("nan"))
        lines.append(f"{cfg.max_staleness:>13} " + " ".join(f"{means[k]:>10.3f}" for k, _ in keys)
                     + f" {reward:>16.3f}")
    lines.append(f"step time, overlapped / on-policy: {step_s[1] / step_s[0]:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
