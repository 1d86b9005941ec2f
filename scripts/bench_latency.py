"""Latency profile of spawn/join decoding against sequential decoding, phase by phase.

What it does, in one run (no Ray: one engine in this process's control, as ``threadweaver eval`` uses it):

1. takes the models: by default the rote benchmark of ``scripts/bench_rollout.py`` (the tiny model taught by
   rote the parallel responses of a few synthetic-task problems, as units and as whole sequences, so that
   parallel and sequential decoding do *the same work* and differ only in scheduling); or, with ``--model``,
   a trained parallel model and ``--baseline-model`` (default: the same) on the first ``--limit`` prompts of
   ``--data`` (for instance the main job's two models on its test split); two models of one architecture
   share one engine and take turns run by run (weights reloaded in place between them, untimed), so that load
   changes on a shared machine hit both alike;
2. *isolated*: decodes every problem alone (one trajectory in flight, greedy), ``--repeats`` times, in
   parallel mode with the model and in sequential mode with the baseline, with an engine trace
   (``rollout.profile``): every engine step labelled by phase (prompt prefill, prefix decode, spawn
   prefill, threads, slowest thread, join prefill, continuation) plus vLLM's input processing (submit)
   and the Python between engine steps (orchestrator); prefilled prompt tokens computed and served
   from the prefix cache (vLLM's ``num_cached_tokens``);
3. *batch* (``--batch-n N``): every problem N times at once in each mode (the rote benchmark's setting:
   2 problems x 8), the same trace, steps labelled by the most expensive work in them;
4. prints the profile tables side by side, the per-problem token-latency speedup
   (``L_total`` sequential / ``L_crit`` parallel), wall-clock speedup and **latency efficiency**
   (wall-clock speedup / token-latency speedup per problem, then the mean), and where the gap goes:
   each phase's time above one sequential decode step per token;
5. with ``--breakdown`` (in-process engine only): every decode step split into vLLM's parts (scheduler,
   model input preparation, forward pass, sampler, scheduler update, output processing), each fitted as a
   fixed cost plus a cost per sequence in the step, which says what a thread costs on this engine.

In the batch it also prints the latency efficiency that the decode-step cost fit alone predicts (every step
costs ``fixed + per sequence * sequences``; prefill, submit and orchestrator overheads left out), which separates
what k threads per trajectory cost on this engine from the overheads around the steps.

Nothing is asserted; timings on a shared CPU machine are noisy, so compare the columns of one run and run
it alone on the machine, with the load average next to it. Engine settings are ``rollout.engine.make_llm``'s
defaults unless ``--engine`` overrides them (``--engine block_size=128``: vLLM's CPU default;
``--engine in_process=true``: no engine-core processes) and ``--sampling`` adds request fields
(``--sampling flat_logprobs=false``: vLLM's per-token log-probability dicts).

    .venv/bin/python scripts/bench_latency.py --work-dir runs/bench
    .venv/bin/python scripts/bench_latency.py --work-dir runs/bench --engine in_process=true --breakdown
    .venv/bin/python scripts/bench_latency.py --model runs/pipeline_tiny/rl_parallel/final/hf \\
        --baseline-model runs/pipeline_tiny/rl_sequential/final/hf --data runs/pipeline_tiny/data/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

for _name, _value in {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
                      "VLLM_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(_name, _value)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models (default: the rote benchmark)")
    g.add_argument("--model", type=Path, default=None, help="parallel model folder (default: the rote model)")
    g.add_argument("--baseline-model", type=Path, default=None,
                   help="sequential baseline model folder (default: --model)")
    g.add_argument("--data", type=Path, default=None, help="JSONL with a 'prompt' field (required with --model)")
    g.add_argument("--limit", type=int, default=20, help="first problems of --data (default 20)")
    g = p.add_argument_group("rote benchmark (without --model)")
    g.add_argument("--work-dir", type=Path, default=None,
                   help="where the rote model goes (default: a temporary directory); a taught model there is reused")
    g.add_argument("--problems", type=int, default=2, help="problems taught by rote (default 2)")
    g.add_argument("--threads", type=int, default=4, help="threads per block of the taught responses (default 4)")
    g.add_argument("--b-digits", type=int, default=2, help="digits of the multi-digit factor (default 2)")
    g.add_argument("--teach-steps", type=int, default=2000, help="most rote-learning steps (default 2000)")
    g = p.add_argument_group("decoding")
    g.add_argument("--repeats", type=int, default=5, help="isolated decodings of every problem per mode (default 5)")
    g.add_argument("--batch-n", type=int, default=8,
                   help="batch profile: every problem this many times at once (default 8; 0: skip)")
    g.add_argument("--batch-repeats", type=int, default=3, help="batch runs per mode (default 3)")
    g.add_argument("--max-tokens", type=int, default=1024, help="generated-token budget per trajectory (default 1024)")
    g.add_argument("--max-context", type=int, default=2048, help="per-request context limit (default 2048)")
    g.add_argument("--max-thread-tokens", type=int, default=512, help="thread length limit (default 512)")
    g = p.add_argument_group("engine and output")
    g.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                   help="a rollout.engine.make_llm keyword (int, float, true/false, none or text); repeatable")
    g.add_argument("--sampling", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra vllm.SamplingParams field for every request (VLLMEngine sampling_overrides)")
    g.add_argument("--breakdown", action="store_true",
                   help="time the parts of every engine step (vLLM's scheduler, model input preparation, forward, "
                        "sampler, scheduler update, output processing) and fit each as fixed + per sequence; needs "
                        "--engine in_process=true (the timing wrappers add a few microseconds per step)")
    g.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    return p.parse_args()


def engine_kwargs(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bench_latency: --engine wants KEY=VALUE, got {item!r}")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif low == "none":
            out[key] = None
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def rote_model(work: Path, args) -> tuple[Path, list[str]]:
    from rollout.rote import teach
    from rollout.task import TaskConfig, make_dataset
    from rollout.tiny import init_model, load_tokenizer
    from rollout.units import chat_prompt_ids

    cfg = TaskConfig(min_threads=args.threads, max_threads=args.threads, b_digits=args.b_digits)
    records = make_dataset(cfg, {"train": args.problems}, seed=0)["train"]
    base, taught = work / "tiny", work / f"taught-{args.problems}x{args.threads}x{args.b_digits}"
    if not (base / "config.json").exists():
        init_model(base, seed=0)
    if not (taught / "config.json").exists():
        tokenizer = load_tokenizer(base)
        examples = [(chat_prompt_ids(tokenizer, r["prompt"]), r["response_parallel"]) for r in records]
        start = time.perf_counter()
        result = teach(base, taught, examples, tokenizer, max_steps=args.teach_steps)
        print(f"taught {len(examples)} responses by rote in {time.perf_counter() - start:.0f}s: {result}")
        if not result.learned:
            raise SystemExit("bench_latency: the rote model did not learn its responses; raise --teach-steps")
    return taught, [r["prompt"] for r in records]


def data_prompts(path: Path, limit: int) -> list[str]:
    from rollout.check import json_objects

    prompts = []
    for i, rec in json_objects(path):
        if not isinstance(rec.get("prompt"), str):
            raise SystemExit(f"bench_latency: {path}:{i} has no 'prompt' text")
        prompts.append(rec["prompt"])
        if len(prompts) >= limit:
            break
    return prompts


class Runner:
    """One engine, decoding traced runs; :meth:`use` switches it to another model of the same architecture
    (weights reloaded in place, untimed)."""

    def __init__(self, model_dir: Path, args, kwargs: dict, sampling: dict | None = None):
        from rollout.engine import VLLMEngine, make_llm
        from rollout.tiny import load_tokenizer

        t0 = time.perf_counter()
        self.llm = make_llm(model_dir, max_model_len=args.max_context, **kwargs)
        self.start_s = time.perf_counter() - t0
        self.model_dir = Path(model_dir).resolve()
        self.tokenizer = load_tokenizer(model_dir)
        self.engine = VLLMEngine(self.llm, sampling_overrides=sampling)
        self.processes = engine_processes()
        self.reloads, self.reload_s = 0, 0.0

    def use(self, model_dir: Path) -> None:
        """Decode with ``model_dir`` from now on (its weights loaded in place when another model is loaded)."""
        from rollout.tiny import load_tokenizer
        from rollout.weights import reload_in_place

        if Path(model_dir).resolve() == self.model_dir:
            return
        t0 = time.perf_counter()
        reload_in_place(self.llm, model_dir)
        self.reload_s += time.perf_counter() - t0
        self.reloads += 1
        self.model_dir, self.tokenizer = Path(model_dir).resolve(), load_tokenizer(model_dir)

    def time_parts(self) -> None:
        """Time the parts of every engine step (:data:`STEP_PARTS`) into the trace of the run in progress.

        Only an in-process engine (``--engine in_process=true``) runs them in this process. The wrappers
        replace vLLM's bound methods on this engine's objects; the engine is used for this run only.
        """
        engine = self.llm.llm_engine
        core = getattr(engine.engine_core, "engine_core", None)
        if core is None:
            raise SystemExit("bench_latency: --breakdown needs an in-process engine (--engine in_process=true)")
        runner = core.model_executor.driver_worker.worker.model_runner
        model = runner.get_model()
        targets = {"schedule": (core.scheduler, "schedule"), "model": (core.model_executor, "execute_model"),
                   "prepare inputs": (runner, "_prepare_inputs"), "forward": (model, "forward"),
                   "sample": (core.model_executor, "sample_tokens"), "update": (core.scheduler, "update_from_output"),
                   "outputs": (engine.output_processor, "process_outputs")}
        for name, (obj, attr) in targets.items():
            setattr(obj, attr, self._timed(getattr(obj, attr), name))

    def _timed(self, fn, name: str):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.engine.trace is not None:
                    self.engine.trace.part(name, time.perf_counter() - t0)
        return call

    def prompt_ids(self, texts: list[str], model_dir: Path) -> list[list[int]]:
        """``texts`` in ``model_dir``'s chat template."""
        from rollout.tiny import load_tokenizer
        from rollout.units import chat_prompt_ids

        tokenizer = load_tokenizer(model_dir)
        return [chat_prompt_ids(tokenizer, t) for t in texts]

    def run(self, prompts: list[list[int]], config, indices: list[int], model_dir: Path):
        """Decode ``prompts`` at once with ``model_dir``; returns (trajectories, profile)."""
        from rollout.orchestrator import generate
        from rollout.profile import EngineTrace, phase_profile

        self.use(model_dir)
        trace = EngineTrace()
        self.engine.trace = trace
        t0 = time.perf_counter()
        out = generate(self.engine, self.tokenizer, prompts, config, prompt_indices=indices)
        wall = time.perf_counter() - t0
        self.engine.trace = None
        return out, phase_profile(trace, wall)

    def close(self) -> None:
        from rollout.engine import shutdown_llm

        shutdown_llm(self.llm)


def engine_processes() -> list[str]:
    """This process and its descendants (vLLM's engine core and worker): name, the CPUs it may run on, its
    thread count and the OpenMP thread count it was started with, from ``/proc``."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    mine, frontier = [os.getpid()], [os.getpid()]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        mine += frontier
    out = []
    for pid in mine:
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        out.append(f"{status['Name'].strip()} (cpus {status['Cpus_allowed_list'].strip()}, "
                   f"{status['Threads'].strip()} threads, OMP_NUM_THREADS {env.get('OMP_NUM_THREADS', '-')})")
    return out


def isolated(runner: Runner, prompts: dict, configs: dict, repeats: int, models: dict) -> dict:
    """Every problem alone, ``repeats`` times in each mode of ``configs`` (interleaved: problem i in every mode,
    each with its model of ``models``, before problem i+1); per mode: the wall clocks per problem, each
    problem's L_crit, the merged profile and the finish reasons. ``prompts``: per mode, in its model's template."""
    from rollout.profile import merge

    for m, cfg in configs.items():  # warm-up (untimed)
        runner.run(prompts[m][:1], replace(cfg, max_tokens=8), [0], models[m])
    n = len(next(iter(prompts.values())))
    out = {m: {"walls": {i: [] for i in range(n)}, "crit": {}, "profiles": [], "finish": set(),
               "lost": []} for m in configs}
    for _ in range(repeats):
        for i in range(n):
            for m, cfg in configs.items():
                [t], prof = runner.run([prompts[m][i]], cfg, [i], models[m])
                o = out[m]
                o["walls"][i].append(prof.wall_s)
                o["crit"][i] = t.L_crit
                o["profiles"].append(prof)
                o["finish"].add(t.finish_reason)
                o["lost"] += lost_steps([t], prof)
    for o in out.values():
        o["profile"] = merge(o.pop("profiles"))
        o["finish"] = sorted(o["finish"])
        o["lost_steps"] = statistics.mean(o.pop("lost"))
    return out


def batch(runner: Runner, prompts: dict, configs: dict, n: int, repeats: int, models: dict) -> dict:
    """All problems ``n`` times at once, ``repeats`` runs per mode (interleaved), each mode with its model."""
    from rollout.profile import merge

    out = {m: {"profiles": [], "latency": [], "crit": [], "lost": []} for m in configs}
    for _ in range(repeats):
        for m, cfg in configs.items():
            trajectories, prof = runner.run(prompts[m], replace(cfg, n=n), list(range(len(prompts[m]))), models[m])
            out[m]["profiles"].append(prof)
            out[m]["latency"].append(statistics.mean(t.latency_s for t in trajectories))
            out[m]["crit"] = [t.L_crit for t in trajectories]
            out[m]["lost"] += lost_steps(trajectories, prof)
    return {m: {"profile": merge(o["profiles"]), "latency_s": statistics.median(o["latency"]),
                "L_crit": statistics.mean(o["crit"]), "trajectories": len(o["crit"]),
                "wall_s": statistics.median(p.wall_s for p in o["profiles"]),
                "lost_steps": statistics.mean(o["lost"])} for m, o in out.items()}


def lost_steps(trajectories: list, prof) -> list[int]:
    """Per trajectory of one run: engine steps it spanned above its L_crit (steps lost between its requests)."""
    return [prof.trajectory_steps[i] - t.L_crit for i, t in enumerate(trajectories)]


# --------------------------------------------------------------------------- tables


def _f(x: float, digits: int = 2) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def profile_table(profiles: dict, per: dict) -> str:
    """Per-phase table, the modes side by side; every count and time divided by ``per[mode]`` (trajectories)."""
    from rollout.profile import GAP_PHASES, STEP_PHASES

    modes = list(profiles)
    cols = ("steps", "ms/step", "ms", "seqs/step", "prefill computed/cached")
    lines = ["| phase | " + " | ".join(f"{m} {c}" for m in modes for c in cols) + " |",
             "|---|" + "---:|" * (len(cols) * len(modes))]
    for phase in STEP_PHASES + GAP_PHASES + ("other", "total"):
        cells = []
        for m in modes:
            prof, k = profiles[m], per[m]
            if phase == "other":
                cells += ["", "", _f(1000 * prof.other_s / k, 1), "", ""]
            elif phase == "total":
                cells += [_f(prof.steps / k, 1), _f(1000 * prof.wall_s / prof.steps), _f(1000 * prof.wall_s / k, 1),
                          "", ""]
            elif phase in GAP_PHASES:
                s = prof.phases[phase]
                cells += [_f(s.steps / k, 1) if phase == "submit" else "", "", _f(1000 * s.seconds / k, 1), "", ""]
            else:
                s = prof.phases[phase]
                pre = (f"{s.prefill_computed / k:.1f} / {s.prefill_cached / k:.1f}"
                       if s.prefill_computed or s.prefill_cached else "")
                cells += [_f(s.steps / k, 1), _f(s.ms_per_step), _f(1000 * s.seconds / k, 1), _f(s.mean_sequences, 1),
                          pre]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_table(par, seq, per_par: int, per_seq: int) -> tuple[str, dict]:
    """Each phase's time per trajectory above one sequential decode step per token (ms)."""
    from rollout.profile import GAP_PHASES, STEP_PHASES

    ref = seq.phases["prefix decode"].ms_per_step
    rows, excess = [], {}
    for phase in STEP_PHASES + GAP_PHASES + ("other",):
        vals = []
        for prof, k in ((par, per_par), (seq, per_seq)):
            if phase == "other":
                vals.append(1000 * prof.other_s / k)
            else:
                s = prof.phases[phase]
                base = s.steps * ref if phase in STEP_PHASES else 0.0
                vals.append((1000 * s.seconds - base) / k)
        excess[phase] = vals
        if abs(vals[0]) >= 0.05 or abs(vals[1]) >= 0.05:
            rows.append(f"| {phase} | {vals[0]:+.1f} | {vals[1]:+.1f} | {vals[0] - vals[1]:+.1f} |")
    tot = [sum(v[0] for v in excess.values()), sum(v[1] for v in excess.values())]
    rows.append(f"| total | {tot[0]:+.1f} | {tot[1]:+.1f} | {tot[0] - tot[1]:+.1f} |")
    head = (f"| phase | parallel ms above {ref:.2f} ms/step | sequential ms above it | "
            "parallel minus sequential |\n|---|---:|---:|---:|")
    return head + "\n" + "\n".join(rows), {"reference_ms_per_token": ref, "excess_ms": excess}


def efficiency(walls: dict, crit: dict) -> dict:
    """Per problem: token-latency speedup, wall-clock speedup (medians of the repeats), their ratio."""
    rows = []
    for i in walls["parallel"]:
        wp, ws = statistics.median(walls["parallel"][i]), statistics.median(walls["sequential"][i])
        token = crit["sequential"][i] / crit["parallel"][i] if crit["parallel"][i] else float("nan")
        wall = ws / wp
        rows.append({"problem": i, "L_crit_parallel": crit["parallel"][i], "L_sequential": crit["sequential"][i],
                     "wall_parallel_s": wp, "wall_sequential_s": ws, "token_speedup": token, "wall_speedup": wall,
                     "latency_efficiency": wall / token})
    mean = lambda k: statistics.mean(r[k] for r in rows)  # noqa: E731
    return {"problems": rows, "token_speedup": mean("token_speedup"), "wall_speedup": mean("wall_speedup"),
            "latency_efficiency": mean("latency_efficiency"),
            "latency_efficiency_median": statistics.median(r["latency_efficiency"] for r in rows)}


#: per-step series of a Profile left out of --json
SERIES = ("decode_steps", "decode_parts")

#: parts of an engine step timed by ``--breakdown``; "model" holds "prepare inputs" and "forward"
STEP_PARTS = ("schedule", "model", "prepare inputs", "forward", "sample", "update", "outputs")


def parts_table(profiles: dict) -> tuple[str, dict]:
    """Per part of a decode step: the least-squares fixed cost and cost per sequence over both modes' decode
    steps, and the part's mean ms per step in each mode."""
    from rollout.profile import step_cost_fit

    rows = ["| part of a decode step | fixed ms | ms per sequence | "
            + " | ".join(f"{m} ms/step" for m in profiles) + " |", "|---|---:|---:|" + "---:|" * len(profiles)]
    out = {}
    top = [k for k in STEP_PARTS if k not in ("prepare inputs", "forward")]
    for name in STEP_PARTS + ("rest of the step",):
        points, means = [], {}
        for m, prof in profiles.items():
            vals = [(n, part["step"] - sum(part.get(k, 0.0) for k in top) if name == "rest of the step"
                     else part.get(name, 0.0)) for n, part in prof.decode_parts]
            points += vals
            means[m] = 1000 * statistics.mean(v for _, v in vals) if vals else float("nan")
        fit = step_cost_fit(points) or (float("nan"), float("nan"))
        out[name] = {"fixed_ms": 1000 * fit[0], "per_sequence_ms": 1000 * fit[1], "ms_per_step": means}
        rows.append(f"| {name} | {_f(1000 * fit[0], 3)} | {_f(1000 * fit[1], 4)} | "
                    + " | ".join(_f(means[m], 3) for m in profiles) + " |")
    return "\n".join(rows), out


def fit_line(profiles: dict) -> tuple[str, dict]:
    """The decode-step cost fit over both modes' decode steps, as a sentence and as numbers."""
    from rollout.profile import step_cost_fit

    steps = [x for p in profiles.values() for x in p.decode_steps]
    fit = step_cost_fit(steps)
    if fit is None:
        return "decode-step cost: one batch size only, no fit", {}
    a, b = fit
    sizes = sorted({n for n, _ in steps})
    return (f"decode-step cost (least squares over {len(steps)} decode steps of both modes, {sizes[0]} to "
            f"{sizes[-1]} sequences): {1000 * a:.2f} ms + {1000 * b:.3f} ms per sequence",
            {"fixed_ms": 1000 * a, "per_sequence_ms": 1000 * b, "steps": len(steps)})


def step_cost_bound(profiles: dict, fit: dict, token: float) -> tuple[str, float]:
    """The latency efficiency the decode-step cost alone predicts: every engine step of both modes costs the fitted
    ``fixed + per sequence * sequences in it`` (prefill steps cost what a decode step of as many sequences costs;
    submit, the orchestrator and the time between steps cost nothing; steps lost between requests still count).
    The rest of the gap to the measured efficiency is those overheads, plus noise: the fit is a least-squares line
    over both modes' steps, and load from other processes that varies between the runs moves it."""
    from rollout.profile import STEP_PHASES

    if not fit:
        return "", float("nan")
    a, b = fit["fixed_ms"], fit["per_sequence_ms"]
    cost = {m: sum(a * p.phases[ph].steps + b * p.phases[ph].sequences for ph in STEP_PHASES) / p.runs
            for m, p in profiles.items()}
    bound = cost["sequential"] / cost["parallel"] / token
    return (f"decode-step cost alone ({a:.2f} ms + {b:.3f} ms per sequence for every step): parallel "
            f"{cost['parallel']:.0f} ms, sequential {cost['sequential']:.0f} ms per run, latency efficiency it "
            f"predicts {bound:.3f}"), bound


def main() -> None:
    args = parse_args()
    from rollout.config import RolloutConfig

    kwargs = engine_kwargs(args.engine)
    if args.model is None:
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-latency-"))
        model, texts = rote_model(work, args)
        models = {"parallel": model, "sequential": model}
        source = f"rote benchmark: {len(texts)} problems taught by rote ({args.threads} threads per block)"
    else:
        if args.data is None:
            raise SystemExit("bench_latency: --model needs --data")
        texts = data_prompts(args.data, args.limit)
        models = {"parallel": args.model, "sequential": args.baseline_model or args.model}
        source = f"{models['parallel']} (parallel) against {models['sequential']} (sequential), {len(texts)} prompts"
    base = RolloutConfig(temperature=0.0, seed=None, max_tokens=args.max_tokens, max_context=args.max_context,
                         max_thread_tokens=args.max_thread_tokens)
    configs = {"parallel": base, "sequential": replace(base, sequential=True)}

    load = [open("/proc/loadavg").read().split()[:3]]
    results: dict = {"source": source, "engine": kwargs, "sampling": args.sampling}
    iso: dict = {}
    bat: dict = {}
    start_s: list[float] = []
    processes: list[str] = []
    reloads: list[tuple[int, float]] = []
    from rollout.weights import same_architecture

    groups = ([("parallel", "sequential")] if same_architecture(models["parallel"], models["sequential"])
              else [("parallel",), ("sequential",)])  # one engine takes turns between models of one architecture
    for group in groups:
        runner = Runner(models[group[0]], args, kwargs, engine_kwargs(args.sampling))
        start_s.append(runner.start_s)
        processes += runner.processes
        if args.breakdown:
            runner.time_parts()
        try:
            prompts = {m: runner.prompt_ids(texts, models[m]) for m in group}
            cfgs = {m: configs[m] for m in group}
            iso.update(isolated(runner, prompts, cfgs, args.repeats, models))
            if args.batch_n:
                bat.update(batch(runner, prompts, cfgs, args.batch_n, args.batch_repeats, models))
            reloads.append((runner.reloads, runner.reload_s))
        finally:
            runner.close()
    load.append(open("/proc/loadavg").read().split()[:3])

    n = len(texts) * args.repeats
    eff = efficiency({m: iso[m]["walls"] for m in iso}, {m: iso[m]["crit"] for m in iso})
    profiles = {m: iso[m]["profile"] for m in ("parallel", "sequential")}
    sampling = f"; sampling {args.sampling}" if args.sampling else ""
    print(f"\n{source}; engine {kwargs or 'make_llm defaults'}{sampling} (started in "
          f"{', '.join(f'{s:.0f}' for s in start_s)} s); load average before {' '.join(load[0])}, "
          f"after {' '.join(load[1])}; processes: {'; '.join(processes)}"
          + (f"; the two models took turns on one engine ({sum(r for r, _ in reloads)} weight reloads, "
             f"{sum(t for _, t in reloads):.1f} s, untimed)" if sum(r for r, _ in reloads) else "") + "\n")
    print(f"## isolated decoding: each problem alone, {args.repeats} repeats, per trajectory "
          f"(finish: parallel {','.join(iso['parallel']['finish'])}, sequential "
          f"{','.join(iso['sequential']['finish'])})\n")
    print(profile_table(profiles, {"parallel": n, "sequential": n}))
    table, gap = gap_table(profiles["parallel"], profiles["sequential"], n, n)
    print("\nwhere the gap goes (time per trajectory above one sequential decode step per generated token):\n")
    print(table)
    line, fit = fit_line(profiles)
    print(f"\n{line}")
    if args.breakdown:
        table, results["isolated_parts"] = parts_table(profiles)
        print("\nparts of a decode step (least squares over both modes' decode steps):\n")
        print(table)
    print(f"\ntoken-latency speedup {eff['token_speedup']:.3f}x, wall-clock speedup {eff['wall_speedup']:.3f}x, "
          f"latency efficiency {eff['latency_efficiency']:.3f}, median {eff['latency_efficiency_median']:.3f} (means "
          f"over {len(eff['problems'])} problems of per-problem ratios; wall: median of the repeats)")
    print(f"engine steps lost between requests, per trajectory: parallel {iso['parallel']['lost_steps']:.2f}, "
          f"sequential {iso['sequential']['lost_steps']:.2f}")
    results.update(load=load, engine_start_s=start_s, processes=processes, isolated={
        "efficiency": eff, "gap": gap, "step_cost": fit, "lost_steps": {m: iso[m]["lost_steps"] for m in iso},
        "profile": {m: {k: v for k, v in asdict(p).items() if k not in SERIES} for m, p in profiles.items()}})
    if bat:
        per = {m: args.batch_repeats for m in bat}
        bprof = {m: bat[m]["profile"] for m in bat}
        print(f"\n## batch: {len(texts)} problems x {args.batch_n} at once, {args.batch_repeats} runs, per run\n")
        print(profile_table(bprof, per))
        table, bgap = gap_table(bprof["parallel"], bprof["sequential"], args.batch_repeats, args.batch_repeats)
        print("\nwhere the gap goes (time per run above one sequential decode step per step):\n")
        print(table)
        line, bfit = fit_line(bprof)
        print(f"\n{line}")
        p, s = bat["parallel"], bat["sequential"]
        bound_line, bound = step_cost_bound(bprof, bfit, s["L_crit"] / p["L_crit"])
        if bound_line:
            print(bound_line)
        if args.breakdown:
            table, results["batch_parts"] = parts_table(bprof)
            print("\nparts of a decode step (least squares over both modes' decode steps):\n")
            print(table)
        p, s = bat["parallel"], bat["sequential"]
        token, wall = s["L_crit"] / p["L_crit"], s["latency_s"] / p["latency_s"]
        print(f"\nmean L_crit {p['L_crit']:.1f} vs {s['L_crit']:.1f} (token-latency speedup {token:.3f}x); mean "
              f"trajectory latency {p['latency_s']:.3f} s vs {s['latency_s']:.3f} s (wall-clock speedup {wall:.3f}x); "
              f"efficiency {wall / token:.3f}")
        print(f"engine steps lost between requests, per trajectory: parallel {p['lost_steps']:.2f}, "
              f"sequential {s['lost_steps']:.2f}")
        results["batch"] = {m: {k: ({kk: vv for kk, vv in asdict(v).items() if kk not in SERIES}
                                    if k == "profile" else v) for k, v in bat[m].items()} for m in bat}
        results["batch"].update(gap=bgap, step_cost=bfit, step_cost_bound=bound, efficiency={
            "token_speedup": token, "wall_speedup": wall, "latency_efficiency": wall / token})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
