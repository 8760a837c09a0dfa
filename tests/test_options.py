"""Each choice of a config group takes only its own keys, and each group's
choices live in one registry that a new entry joins from anywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env
from transferlab.compose import compose
from transferlab.config.validate import ConfigError, load_config, option_keys, option_registries

CONF = REPO / "conf"

IGNORED_BEFORE = [
    # (overrides, the message's start, a key the chosen option does take)
    (["optimizer=sgd", "optimizer.betas=[0.5,0.5]"], "optimizer.betas: optimizer 'sgd' takes no 'betas'", "momentum"),
    (["scheduler=cosine", "scheduler.step_size=99"], "scheduler.step_size: scheduler 'cosine' takes no 'step_size'",
     "min_lr_mult"),
    (["head=linear", "head.pooling=max"], "head.pooling: head 'linear' takes no 'pooling'", "hidden"),
    (["backbone=resnet18", "backbone.width=7"], "backbone.width: backbone 'resnet18' takes no 'width'", "weights"),
]


@pytest.mark.parametrize("overrides,start,allowed", IGNORED_BEFORE)
def test_a_key_the_choice_does_not_take_is_refused_by_composition(overrides: list[str], start: str,
                                                                   allowed: str) -> None:
    with pytest.raises(ConfigError) as caught:
        compose(overrides, config_dir=CONF)
    assert str(caught.value).startswith(start)
    assert f"'{allowed}'" in str(caught.value)


@pytest.mark.parametrize("overrides,start,allowed", IGNORED_BEFORE)
def test_a_key_the_choice_does_not_take_is_refused_in_params(overrides: list[str], start: str,
                                                              allowed: str) -> None:
    """Also when it reaches a stage through params.yaml (a hand edit, or Hydra's `+key=`)."""
    params = compose([overrides[0]], config_dir=CONF)
    key, _, value = overrides[1].partition("=")
    group, _, name = key.partition(".")
    params[group][name] = value
    with pytest.raises(ConfigError, match="^" + start.replace("(", r"\(")):
        load_config(params)


def test_the_app_refuses_before_any_work(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(CONF, tmp_path / "conf")
    proc = subprocess.run([sys.executable, "-m", "transferlab", "optimizer=sgd", "optimizer.betas=[0.5,0.5]"],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: optimizer.betas: optimizer 'sgd' takes no 'betas'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]  # no run folder, no store


def test_every_option_file_holds_exactly_its_choice_s_keys() -> None:
    import yaml

    for group in option_registries():
        for path in sorted((CONF / group).glob("*.yaml")):
            option = yaml.safe_load(path.read_text())
            assert sorted(option) == option_keys(group, option["name"]), path


def test_unknown_class_names_with_a_positive_class_are_refused_not_dropped() -> None:
    from transferlab.config.preflight import preflight
    from transferlab.data import DataError

    cfg = load_config(compose(["experiment=keras_mlp", "data.positive_class=3", "data.classes=[3,8,x]"],
                              config_dir=CONF))
    with pytest.raises(DataError, match=r"^data.classes=\['3', '8', 'x'\]: Unknown class 'x'"):
        preflight(cfg, tracking=False)
