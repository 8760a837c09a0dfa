"""`transferlab report`: its statistics against hand-computed values, its config's checks, and the quick
mode end to end (one multirun under one MLflow parent, the report's run ids in the store, a rerun that
reuses every run)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_project, subprocess_env
from transferlab.errors import ConfigError
from transferlab.report import load_report_config, merge
from transferlab.stats import HELPS, HURTS, NO_EFFECT, paired_difference, summarise, verdict

T_975_2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (tables: 4.303)


def test_mean_and_sample_std() -> None:
    s = summarise([1.0, 2.0, 3.0, 4.0])
    assert (s.n, s.mean) == (4, 2.5)
    assert s.std == pytest.approx(math.sqrt(5 / 3))  # squares 2.25+0.25+0.25+2.25 = 5, over n - 1 = 3
    assert math.isnan(summarise([0.7]).std)


def test_paired_difference_and_its_t_interval() -> None:
    on = {0: 0.90, 1: 0.92, 2: 0.94, 7: 0.5}  # seed 7 has no partner: left out
    off = {0: 0.88, 1: 0.89, 2: 0.90}
    d = paired_difference(on, off)
    assert d.seeds == (0, 1, 2)
    assert d.differences == pytest.approx((0.02, 0.03, 0.04))
    assert d.mean == pytest.approx(0.03)
    assert d.std == pytest.approx(0.01)
    half = T_975_2 * 0.01 / math.sqrt(3)  # 0.024841
    assert (d.low, d.high) == (pytest.approx(0.03 - half), pytest.approx(0.03 + half))
    assert verdict(d) == HELPS


def test_the_verdict_reads_the_interval_not_the_mean() -> None:
    # mean +0.01 but sd 0.02: half-width 4.3027 * 0.02 / sqrt(3) = 0.0497, so 0 is inside
    d = paired_difference({0: 0.91, 1: 0.89, 2: 0.93}, {0: 0.90, 1: 0.90, 2: 0.90})
    assert d.mean == pytest.approx(0.01) and d.low < 0 < d.high
    assert verdict(d) == NO_EFFECT
    worse = paired_difference({0: 0.88, 1: 0.87, 2: 0.86}, {0: 0.90, 1: 0.90, 2: 0.90})
    assert worse.high < 0 and verdict(worse) == HURTS
    # a loss: lower is better, so a negative difference helps
    assert verdict(worse, higher_is_better=False) == HELPS


def test_degenerate_samples() -> None:
    same_shift = paired_difference({0: 0.9, 1: 0.8}, {0: 0.85, 1: 0.75})
    assert (same_shift.low, same_shift.high) == (pytest.approx(0.05), pytest.approx(0.05))
    assert verdict(same_shift) == HELPS
    assert verdict(paired_difference({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8})) == NO_EFFECT
    one = paired_difference({0: 0.9}, {0: 0.1})
    assert math.isnan(one.low) and verdict(one) == NO_EFFECT  # one seed gives no interval


def test_merge_lets_a_later_override_of_a_key_win() -> None:
    assert merge(["a=1", "b=2"], ["a=3"], ["+c=4"]) == ["b=2", "a=3", "+c=4"]


def test_report_configs_load(tmp_path: Path) -> None:
    default = load_report_config("default", REPO / "conf")
    names = [t.name for t in default.techniques]
    assert {"pretrained", "backbone_lr", "hidden_dropout", "input_dropout", "max_norm", "freeze_first_layer",
            "overcomplete_head", "sgd_momentum_decay", "augmentation", "ema"} <= set(names)
    sweep = next(t for t in default.techniques if t.name == "hidden_dropout")
    assert sweep.arms[0].overrides == ("regularisation.dropout.hidden=0.0",)  # the reference: no dropout
    quick = load_report_config("quick", REPO / "conf")
    assert len(quick.seeds) == 2 and [t.name for t in quick.techniques] == ["pretrained", "freeze_first_layer"]


@pytest.mark.parametrize(("text", "message"), [
    ("seeds: [0]\ntechniques: [{name: a, with: [x=1]}]", "at least two distinct"),
    ("seeds: [0, 1]\ntechniques: [{name: a, on: [x=1]}]", "the arms are `with` and `without`"),
    ("seeds: [0, 1]\ntechniques: [{name: a, wiht: [x=1]}]", "takes no ['wiht']"),
    ("seeds: [0, 1]\ntechniques: [{name: a, kind: grid}]", "Unknown ablation kind 'grid'"),
    ("seeds: [0, 1]\ntechniques: [{name: a, kind: sweep, key: k, values: [1]}]", "at least two values"),
    ("seeds: [0, 1]\ntechnique: []", "unknown keys ['technique']"),
    ("seeds: [0, 1]\ntechniques: [{name: a, with: [oops]}]", "list of overrides"),
])
def test_a_bad_report_config_is_refused_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "mine.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_report_config("mine", tmp_path)
    assert "mine.yaml" in str(err.value)


TINY = ["trainer.epochs=1", "pretrain.epochs=1", "backbone.width=8"]


def _report(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transferlab", "report", *args], cwd=project, env=subprocess_env(),
                          capture_output=True, text=True, timeout=240)


def test_a_bad_arm_fails_before_any_work(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    (project / "conf" / "report" / "bad.yaml").write_text(
        "seeds: [0, 1]\ntechniques: [{name: a, with: [regularisation.dropout.hidden=1.5]}]\n")
    proc = _report(project, "--config", "bad", *TINY)
    assert proc.returncode == 2, proc.stderr
    assert "technique 'a'" in proc.stderr and "regularisation.dropout.hidden" in proc.stderr
    assert not (project / "outputs").exists() and not (project / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_report_end_to_end_and_its_rerun_reuses_the_runs(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    project = copy_project(tmp_path / "project")
    proc = _report(project, "--quick", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 2 techniques whose "with" arms are both the base: 3 distinct arms x 2 seeds, a line per finished job
    assert len(re.findall(r"report: job \d+/6 done", proc.stdout)) == 6, proc.stdout
    md = (project / "reports" / "quick" / "report.md").read_text()
    html = (project / "reports" / "quick" / "report.html").read_text()
    assert "data:image/png;base64," in html and "<img" in html and "src='plots/" not in html
    assert (project / "reports" / "quick" / "plots" / "pretrained.png").is_file()
    assert md.count("Verdict:") == 2
    assert re.search(r"\*\*(helps|hurts|no measurable effect at this sample size)\*\*", md)
    assert "python -m transferlab " in md and "backbone.weights=null" in md and "data.split_seed=0" in md

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    parent_id = re.search(r"MLflow parent run (\w{32})", proc.stdout).group(1)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 6 and {c.info.status for c in children} == {"FINISHED"}
    linked = set(re.findall(r"/runs/(\w{32})\)", md))
    assert linked == {c.info.run_id for c in children}  # every run reported, and every reported run exists
    assert {a.path for a in client.list_artifacts(parent_id, "report")} == {"report/report.md", "report/report.html"}

    # The rerun goes through the report's DVC stage (reports/ is a DVC project of its own), pointed at this
    # quick report: it reuses every run, and the pipeline's own `dvc status` never sees the stage.
    stage = yaml.safe_load((project / "reports" / "dvc.yaml").read_text())
    report = stage["stages"]["report"]
    assert report["cmd"] == "cd .. && env -u DVC_ROOT python -m transferlab report" and report["always_changed"] is True
    report["cmd"] += " --quick " + " ".join(TINY)
    report["outs"] = [{out.replace("default/", "quick/"): spec} for item in report["outs"] for out, spec in item.items()]
    (project / "reports" / "dvc.yaml").write_text(yaml.safe_dump(stage))
    started = time.perf_counter()
    again = subprocess.run(["dvc", "repro"], cwd=project / "reports", env=subprocess_env(), capture_output=True,
                           text=True, timeout=240)
    elapsed = time.perf_counter() - started
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Running stage 'report'" in again.stdout and "0 jobs run now, 6 reused" in again.stdout, again.stdout
    assert elapsed < 30, elapsed
    status = subprocess.run(["dvc", "status"], cwd=project, env=subprocess_env(), capture_output=True, text=True)
    assert status.returncode == 0 and "report:" not in status.stdout, status.stdout
    assert len(client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")) == 6
    assert set(re.findall(r"/runs/(\w{32})\)", (project / "reports" / "quick" / "report.md").read_text())) == linked
