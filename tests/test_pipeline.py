"""The one-command pipeline: its config, the wiring of stage configs, refusals, and the per-stage logging helpers.

The integration test runs every stage on the real engines (DeepSpeed, vLLM,
Ray, math-verify, MLflow) at toy sizes, then an RL ablation and a two-point
reward-weight sweep from the pipeline's SFT checkpoint, all in one MLflow store
that it reads back through MLflow's API; the README's main job
(``threadweaver run experiments/pipeline_tiny.yaml``) is the full-size run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config
from cluster.pipeline import PipelineConfig, Progress, check_config, planned_stages, run_pipeline, stage_config
from rl.sft import SFTConfig


def test_pipeline_experiments_load_and_check():
    files = sorted(Path("experiments").glob("pipeline_*.yaml"))
    assert files
    for f in files:
        cfg = load_config(PipelineConfig, f)
        check_config(cfg)
        assert cfg.rl is None or cfg.rl.rollout.n >= 2


def test_stage_config_applies_the_wiring_last_and_keeps_the_section(tmp_path):
    cfg = load_config(PipelineConfig, "experiments/pipeline_tiny.yaml")
    sft = stage_config(SFTConfig, cfg.sft, tmp_path / "s" / "stage_config.yaml",
                       ["steps=7", f"run_dir={tmp_path / 's'}", "data.layout=sequential"])
    assert sft.steps == 7 and sft.data.layout == "sequential" and sft.run_dir == str(tmp_path / "s")
    assert sft.learner.lr == cfg.sft.learner.lr and sft.tokens_per_step == cfg.sft.tokens_per_step
    assert "layout: parallel" in (tmp_path / "s" / "stage_config.yaml").read_text()  # the section as given
    wired = stage_config(SFTConfig, cfg.sft, tmp_path / "w" / "stage_config.yaml", ["steps=7", "data.generate=true"],
                         {"data.generate": False, "data.dir": "x: y"})  # typed values, never parsed as YAML
    assert wired.steps == 7 and wired.data.generate is False and wired.data.dir == "x: y"


def test_bad_stage_overrides_are_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        check_config(load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", ["sft_sequential=[stepz=3]"]))
    with pytest.raises(ConfigError, match="rollout.n"):
        check_config(load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", ["rl_sequential=[rollout.n=1]"]))
    with pytest.raises(ConfigError, match="unknown key 'sft.stepz'; did you mean 'sft.steps'"):
        load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", ["sft.stepz=3"])


def test_a_used_run_dir_is_refused_unless_reuse_and_an_unfinished_stage_is_kept_aside(tmp_path, monkeypatch):
    (tmp_path / "pipeline.json").write_text(json.dumps({"stages": {"data": {"dir": "x", "wall_s": 1.0}}}))
    cfg = load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", [f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"already holds pipeline stages \['data'\]; set reuse=true"):
        run_pipeline(cfg)
    (tmp_path / "pipeline.json").unlink()
    (tmp_path / "sft_parallel").mkdir()
    with pytest.raises(ValueError, match="sft_parallel exists but did not finish"):
        run_pipeline(cfg)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop()

    monkeypatch.setattr("cluster.pipeline.init_ray", stop)  # stop right after the checks
    (tmp_path / "sft_parallel" / "kept.txt").write_text("x")
    (tmp_path / "sft_parallel.incomplete-1").mkdir()
    with pytest.raises(Stop):
        run_pipeline(load_config(PipelineConfig, "experiments/pipeline_tiny.yaml",
                                 [f"run_dir={tmp_path}", "reuse=true"]))
    assert not (tmp_path / "sft_parallel").exists()  # kept aside, the stage runs again
    assert (tmp_path / "sft_parallel.incomplete-2" / "kept.txt").read_text() == "x"


def test_cli_needs_a_file():
    from cluster.cli import main

    assert main(["run"]) == 2
    assert main(["run", "--show-config"]) == 0


@pytest.mark.integration
def test_pipeline_then_an_ablation_and_a_sweep_all_land_in_one_mlflow_store(tmp_path, monkeypatch):
    """The first acceptance point of issue 17, read back through MLflow's API only: every stage of the
    pipeline at toy size, then an RL ablation from its parallel SFT checkpoint, then a two-point reward-weight
    sweep that finds that checkpoint itself (the newest pipeline under ``pipelines``), all tracked in one
    store: the pipeline parent with a child run per stage, the ablation, the sweep parent with its two point
    runs; every run with the git commit, its config file and command; every training run with a logged model
    pointing at its final checkpoint; every RL run naming the SFT run it started from."""
    from mlflow import MlflowClient

    from cluster.cmd_rl import RLRunConfig, run_rl
    from cluster.lineage import run_context
    from cluster.sweep import SweepConfig, sweep

    run_dir = tmp_path / "p"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [f"run_dir={run_dir}", "data.train_size=40", "data.validation_size=4", "data.test_size=4",
                 "data.task.min_threads=2", "data.task.max_threads=3", "sft.steps=2", "sft.tokens_per_step=900",
                 "sft.learner.row_tokens=600",
                 "sft.learner.threads_per_rank=1", "rl.steps=1", "rl.prompts_per_step=2", "rl.rollout.n=2",
                 "rl.rollout.max_tokens=48", "rl.eval.prompts=2", "eval.limit=3", "eval.rollout.max_tokens=48",
                 "eval.pages=2", "tracking.experiment=pipeline_tiny", f"tracking.uri={uri}"]
    recipe = load_config(PipelineConfig, "experiments/pipeline_tiny.yaml")
    for stage, steps in (("sft_sequential", 2), ("rl_sequential", 1)):  # the recipe's own overrides, toy steps
        kept = [o for o in getattr(recipe, stage) if not o.startswith("steps=")]
        overrides.append(f"{stage}={json.dumps(kept + [f'steps={steps}'])}")
    record = run_pipeline(load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", overrides),
                          ["experiments/pipeline_tiny.yaml"])
    assert list(record["stages"]) == ["data", "sft_parallel", "sft_sequential", "rl_parallel", "rl_sequential",
                                      "eval"]
    report = (run_dir / "report.md").read_text()
    for row in ("sequential baseline (SFT + RL)", "ThreadWeaver (SFT)", "ThreadWeaver (SFT + P-GRPO)"):
        assert f"| {row} |" in report  # the paper's rows, the RL stages' starting checkpoints included
    assert "Task ceiling: " in report and "What RL changed" in report and "| of ceiling |" in report
    assert "| sequential baseline (SFT) -> sequential baseline (SFT + RL) |" in report
    ceiling = record["stages"]["data"]["ceiling"]
    assert f"Task ceiling: {ceiling['ceiling/speedup']:.2f}x" in report
    assert all(f"| {stage} |" in report for stage in record["stages"])
    sft_checkpoint = record["stages"]["sft_parallel"]["checkpoint"]
    assert all(len(s["load"]) == 2 and len(s["load"][0]) == 3 for s in record["stages"].values())
    for key in ("parallel", "sequential", "parallel_before", "sequential_before"):
        assert len((run_dir / "eval" / f"tiny_{key}.jsonl").read_text().splitlines()) == 3

    # an RL ablation from the pipeline's parallel SFT checkpoint
    rl_small = ["steps=1", "prompts_per_step=2", "rollout.n=2", "rollout.max_tokens=48", "eval.at_start=false",
                "eval.every=0", "eval.prompts=2", "save_every=0", "progress=false"]
    ablation_cfg = load_config(RLRunConfig, "experiments/rl_tiny.yaml", [
        f"model={sft_checkpoint}", f"data.dir={record['stages']['data']['dir']}", "data.generate=false",
        f"run_dir={tmp_path / 'rl_std'}", "grpo.advantage=std", *rl_small, f"tracking.uri={uri}",
        "tracking.experiment=rl_tiny"])
    ablation = run_rl(ablation_cfg, tags=run_context("rl", ["experiments/rl_tiny.yaml"]))

    # a two-point sweep; its RL config's model and data are missing, so it starts from the newest pipeline's
    point_overrides = [f"model={tmp_path / 'no_model'}", f"data.dir={tmp_path / 'no_data'}", *rl_small,
                       "eval.modes=[parallel]"]
    sweep_cfg = load_config(SweepConfig, "experiments/sweep_tiny.yaml", [
        f"overrides={json.dumps(point_overrides)}",
        "rho=[0.5,1.0]", "clip=[0.2]", "incorrect_reward=[0.0]", f"run_dir={tmp_path / 'sweep'}",
        f"pipelines={tmp_path}", "tracking.experiment=sweep_tiny", f"tracking.uri={uri}", "ray.num_cpus=3"])
    results = sweep(sweep_cfg, run_context("sweep", ["experiments/sweep_tiny.yaml"]))
    assert [r.error for r in results] == [None, None] and [r.point.rho for r in results] == [0.5, 1.0]
    for r in results:
        # a point's metrics are the means over the held-out records its RL run wrote at its last step
        # (2 prompts, greedy, parallel decoding)
        steps = sorted((Path(r.run_dir) / "eval").glob("step_*.jsonl"))
        records = [json.loads(line) for line in steps[-1].read_text().splitlines()]
        assert [x["mode"] for x in records] == ["parallel", "parallel"]
        assert r.metrics["accuracy"] == pytest.approx(sum(x["correct"] for x in records) / 2)
        assert r.metrics["L_crit"] == pytest.approx(sum(x["L_crit"] for x in records) / 2)
        assert 0 < r.metrics["L_crit"] <= r.metrics["L_total"] <= 48  # rollout.max_tokens=48
    assert (tmp_path / "sweep" / "sweep_plot.png").stat().st_size > 5000
    assert "p01_rho1_clip0.2_inc0" in (tmp_path / "sweep" / "sweep.md").read_text()

    # ---- from here on, only MLflow's API: one store holds all of it
    client = MlflowClient(uri)
    experiments = {e.name: e for e in client.search_experiments()}
    assert {"pipeline_tiny", "rl_tiny", "sweep_tiny"} <= set(experiments)
    for name in ("pipeline_tiny", "rl_tiny", "sweep_tiny"):
        assert experiments[name].tags["mlflow.experimentKind"] == "custom_model_development"
    ids = [experiments[n].experiment_id for n in ("pipeline_tiny", "rl_tiny", "sweep_tiny")]
    runs = client.search_runs(ids)
    by_id = {r.info.run_id: r for r in runs}
    children: dict[str, list] = {}
    for r in runs:
        children.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)
    roots = children[None]
    assert sorted(r.data.tags["stage"] for r in roots) == ["pipeline", "rl", "sweep"]
    pipeline, = (r for r in roots if r.data.tags["stage"] == "pipeline")
    stages = {r.info.run_name: r for r in children[pipeline.info.run_id]}
    assert sorted(stages) == sorted(record["stages"])  # one child run per stage
    ablation_run = by_id[ablation["mlflow_run_id"]]
    assert "mlflow.parentRunId" not in ablation_run.data.tags and ablation_run.data.params["grpo.advantage"] == "std"
    sweep_parent, = (r for r in roots if r.data.tags["stage"] == "sweep")
    points = {r.info.run_name: r for r in children[sweep_parent.info.run_id]}
    assert sorted(points) == [r.point.name for r in results]
    assert sorted(r.data.params["reward.rho"] for r in points.values()) == ["0.5", "1.0"]
    assert len(runs) == 1 + 6 + 1 + 1 + 2
    assert all(r.info.status == "FINISHED" for r in runs)
    config_of = {pipeline.info.run_id: "pipeline_tiny.yaml", ablation_run.info.run_id: "rl_tiny.yaml",
                 sweep_parent.info.run_id: "sweep_tiny.yaml"}
    for r in runs:  # the code, the command and the config of every run
        root = r.data.tags.get("mlflow.parentRunId", r.info.run_id)
        assert len(r.data.tags["mlflow.source.git.commit"]) == 40, r.info.run_name
        assert r.data.tags["threadweaver.git_dirty"] in ("true", "false")
        assert r.data.tags["threadweaver.config"].endswith("experiments/" + config_of[root]), r.info.run_name
        assert r.data.tags["threadweaver.command"] and r.data.tags["mlflow.user"] and r.data.tags["threadweaver.host"]
        assert r.data.params, f"{r.info.run_name} has no parameters"

    models = [m for m in client.search_logged_models(experiment_ids=ids)]
    model_of = {m.source_run_id: m for m in models}
    assert len(model_of) == len(models)  # one logged model per run that made one
    training = {**{n: stages[n] for n in ("sft_parallel", "sft_sequential", "rl_parallel", "rl_sequential")},
                "ablation": ablation_run, **points}
    assert set(model_of) == {r.info.run_id for r in training.values()}
    for name, r in training.items():  # the final checkpoint, pointed at (not copied), as the run's output
        m = model_of[r.info.run_id]
        assert m.status == "READY" and m.tags["mlflow.model.isExternal"] == "true"
        assert Path(m.tags["threadweaver.checkpoint"], "config.json").is_file(), name
        assert [o.model_id for o in client.get_run(r.info.run_id).outputs.model_outputs] == [m.model_id]
    for name in ("sft_parallel", "sft_sequential", "rl_parallel", "rl_sequential"):
        assert model_of[stages[name].info.run_id].tags["threadweaver.checkpoint"] == str(
            Path(record["stages"][name]["checkpoint"]).resolve())
    sft_par = stages["sft_parallel"]
    rl_from = {"rl_parallel": sft_par, "rl_sequential": stages["sft_sequential"], "ablation": sft_par,
               **{n: sft_par for n in points}}
    for name, source in rl_from.items():  # RL runs name the SFT run and model they start from
        r = training[name]
        assert r.data.tags["threadweaver.source_run_id"] == source.info.run_id, name
        model_id = model_of[source.info.run_id].model_id
        assert r.data.tags["threadweaver.source_model_id"] == model_id, name
        assert [i.model_id for i in client.get_run(r.info.run_id).inputs.model_inputs] == [model_id], name
    assert {i.dataset.name for i in client.get_run(stages["rl_parallel"].info.run_id).inputs.dataset_inputs} == {
        "train", "validation"}
    assert "eval/tiny/speedup" in {m.key for m in model_of[stages["rl_parallel"].info.run_id].metrics}
    assert {"eval/tiny/parallel/accuracy", "eval/tiny/sequential/L_crit", "time/total_s",
            "eval/tiny/before/parallel/accuracy", "eval/tiny/before/speedup"} <= set(pipeline.data.metrics)
    assert "ceiling/speedup" in stages["data"].data.metrics
    assert {"sweep.md", "sweep.json", "sweep_plot.png"} <= {a.path for a in client.list_artifacts(
        sweep_parent.info.run_id)}
    assert sorted(m.step for m in client.get_metric_history(sweep_parent.info.run_id, "sweep/L_crit")) == [0, 1]

    def no_ray(*args, **kwargs):
        raise AssertionError("a pipeline whose every stage is reused started Ray")

    monkeypatch.setattr("cluster.pipeline.init_ray", no_ray)
    again = run_pipeline(load_config(PipelineConfig, "experiments/pipeline_tiny.yaml", overrides + ["reuse=true"]))
    same = json.dumps(again["stages"], sort_keys=True) == json.dumps(record["stages"], sort_keys=True)  # NaN-safe
    assert same  # every stage reused, nothing rerun


def test_report_embeds_training_curves_and_the_histogram_and_they_load_in_chromium(tmp_path):
    """The final report from stage outputs (written by hand: no engines), rendered to HTML and opened in headless
    Chromium, which must load every image (naturalWidth > 0)."""
    import html
    import re
    import subprocess

    from cluster.pipeline import _final_report
    from cluster.report import CURVES

    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip(f"{chromium} is missing: install Debian's chromium (apt-get install -y chromium)")
    run_dir = tmp_path / "run dir"  # a space: links must still resolve
    for name, base in (("rl_parallel", 1.0), ("rl_sequential", 0.9)):
        (run_dir / name).mkdir(parents=True)
        lines = [{"kind": "eval", "step": 0, "eval/parallel/accuracy": 0.5}]
        lines += [{"kind": "train", "step": s, "train/reward": base + 0.1 * s, "train/correct": 0.5 + 0.1 * s,
                   "train/activation": 0.2 * s, "train/L_crit": 100.0 - s} for s in range(1, 5)]
        (run_dir / name / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "report.md").write_text("# Evaluation\n\n| model | acc |\n|---|---:|\n| a | 1 |\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.savefig(run_dir / "eval" / "speedup_hist.png")
    plt.close(fig)
    record = {"stages": {n: {"wall_s": 60.0, "checkpoint": f"/x/{n}"} for n in ("rl_parallel", "rl_sequential")}}
    record["stages"]["rl_parallel"]["load"] = [[1.5, 1.25, 1.0], [2.0, 1.5, 1.125]]
    report = _final_report(run_dir, record, {"report": str(run_dir / "eval" / "report.md"), "rows": "ROWS\n"},
                           120.0)
    text = report.read_text()
    assert text.startswith("# Pipeline report\n\nROWS\n\n## Evaluation\n")
    assert "| rl_parallel | 1.0 | 1.50 1.25 1.00 -> 2.00 1.50 1.12 | /x/rl_parallel |" in text
    assert "| rl_sequential | 1.0 | - | /x/rl_sequential |" in text
    assert "![training curves](training_curves.png)" in text and "![speedup histogram](eval/speedup_hist.png)" in text
    assert (run_dir / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert len(CURVES) == 4

    probe = """<pre id="probe"></pre><script>window.addEventListener('load', () => {
      document.getElementById('probe').textContent = JSON.stringify([...document.images].map(
        i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth})));
    });</script>"""
    page = run_dir / "report_probe.html"  # next to report.html, so relative links resolve the same way
    page.write_text((run_dir / "report.html").read_text().replace("</body>", probe + "</body>"))
    done = subprocess.run(
        [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert m and m.group(1), "the page did not finish loading in Chromium"
    images = json.loads(html.unescape(m.group(1)))
    assert [i["src"] for i in images] == ["training_curves.png", "eval/speedup_hist.png"]
    assert all(i["ok"] for i in images), images
