"""params.yaml records how it was composed from conf/: real DVC in a project copy finds edits
to conf/, refuses to discard hand edits, accepts `dvc exp branch` results, and a failed
`dvc exp run` says how to restore the workspace."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import run
from hydra_plugins import transferlab_composition as composition

STALE = "conf/ changed since params.yaml was composed: run `python -m transferlab.compose`"
# The cheapest real stage settings: `dvc exp run check -S ...` composes and runs only the check stage.
SMALL = ["-S", "trainer.epochs=1", "-S", "pretrain.epochs=1"]


def _edit_conf(project: Path) -> None:
    with (project / "conf" / "trainer" / "default.yaml").open("a") as f:
        f.write("# a comment: conf/ changed, its composition did not\n")


def _status(project: Path, *targets: str) -> str:
    return run(["dvc", "status", *targets], project).stdout


@pytest.mark.slow
def test_conf_edit_shows_in_dvc_status_and_stops_repro_until_recomposed(project: Path) -> None:
    run(["dvc", "repro", "check"], project)
    assert "up to date" in _status(project, "check")
    _edit_conf(project)
    status = _status(project, "check")
    assert "changed deps" in status and "conf" in status, status

    repro = run(["dvc", "repro"], project, check=False)
    assert repro.returncode != 0
    assert STALE in repro.stdout + repro.stderr
    assert not (project / "data" / "prepared").exists()  # no stage did any work

    run(["python", "-m", "transferlab.compose"], project)
    run(["dvc", "repro", "check", "prepare"], project)  # check runs and passes, a data stage works
    assert (project / "data" / "prepared").is_dir()
    assert "up to date" in _status(project, "check")


@pytest.mark.slow
def test_dvc_exp_branch_passes_the_composition_check(project: Path) -> None:
    run(["dvc", "exp", "run", "check", "-n", "small", *SMALL], project)
    run(["dvc", "exp", "branch", "small", "small-branch"], project)
    run(["git", "checkout", "-q", "--", "."], project)  # the experiment was applied to the workspace
    run(["git", "checkout", "-q", "small-branch"], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["trainer"]["epochs"] == 1 and params["pretrain"]["epochs"] == 1  # DVC's composition
    check = run(["python", "-m", "transferlab.compose", "--check"], project)
    assert "matches conf/" in check.stdout
    # ... and the check still finds a hand edit there.
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("epochs: 1", "epochs: 2", 1))
    check = run(["python", "-m", "transferlab.compose", "--check"], project, check=False)
    assert check.returncode == 1 and "edited by hand" in check.stderr, check.stderr


@pytest.mark.slow
def test_exp_run_refuses_to_discard_a_hand_edit(project: Path) -> None:
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("\nseed: 0\n", "\nseed: 7\n"))
    edited = params.read_bytes()
    for extra in ([], ["--queue"]):
        exp = run(["dvc", "exp", "run", "check", *extra, *SMALL], project, check=False)
        out = exp.stdout + exp.stderr
        assert exp.returncode != 0, out
        assert "params.yaml was edited by hand" in out and "seed: 7 -> 0" in out, out
        assert "trainer.epochs" not in out  # a -S key is not something lost
        assert params.read_bytes() == edited
    assert run(["dvc", "exp", "ls", "--all-commits"], project).stdout.strip() == ""
    assert run(["dvc", "queue", "status"], project).stdout.count("Queued") == 0


def test_the_guard_is_dvc_s_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Outside DVC's composition (our compose, the Hydra app) the resolver only records.
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", tmp_path / "conf")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 1, "composition": {"conf": "x", "params": "y"}}))
    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.create({"seed": 0, "trainer": {"epochs": "${seed}"}, "composition": "${transferlab_composition:}"})
    record = OmegaConf.to_container(cfg, resolve=True)["composition"]
    assert record == composition.record(tmp_path / "conf", {"seed": 0, "trainer": {"epochs": 0}})
    assert record["conf"] == composition.conf_digest(tmp_path / "conf")


@pytest.mark.slow
def test_a_failed_exp_run_says_how_to_restore_the_workspace(project: Path) -> None:
    # A committed pipeline whose every output is in the cache, kept cheap: check and prepare only.
    pipeline = yaml.safe_load((project / "dvc.yaml").read_text())
    pipeline = {"stages": {k: v for k, v in pipeline["stages"].items() if k in ("check", "prepare")}}
    (project / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (project / "dvc.lock").unlink()
    run(["dvc", "repro"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "prepared"], project)
    before = (project / "params.yaml").read_bytes()
    prepared = sorted(p.relative_to(project) for p in (project / "data" / "prepared").rglob("*"))

    # Valid for Hydra, refused by the stage: prepare fails after DVC deleted its outputs.
    exp = run(["dvc", "exp", "run", "prepare", "-S", "data.val_fraction=2.0"], project, check=False)
    out = exp.stdout + exp.stderr
    assert exp.returncode != 0
    assert not (project / "data" / "prepared").exists() and (project / "params.yaml").read_bytes() != before
    hint = out.split("Restore the workspace to the last commit with:\n", 1)[1].splitlines()[0].strip()
    assert hint.startswith("git checkout HEAD -- ") and hint.endswith("&& dvc checkout"), hint

    run(["bash", "-c", hint], project)
    assert (project / "params.yaml").read_bytes() == before
    assert sorted(p.relative_to(project) for p in (project / "data" / "prepared").rglob("*")) == prepared
    assert run(["git", "status", "--porcelain"], project).stdout == ""
    assert "up to date" in _status(project)
