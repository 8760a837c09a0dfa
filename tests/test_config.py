"""Config composition and validation on the real ``conf/``: every preset and
every group option composes and validates; bad values fail with a message
that names the key and what is allowed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from transferlab.compose import compose, config_groups, main as compose_main
from transferlab.config import ConfigError, ExperimentConfig, check_override_keys, load_config
from transferlab.models.backbones import list_backbones
from transferlab.models.heads import list_heads
from transferlab.training.optim import list_optimizers, list_schedulers

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Groups that are not a section of the experiment: presets over several sections, and Hydra's own settings.
PRESET_GROUPS = {"experiment", "hparams_search", "hydra"}
GROUPS = config_groups(CONF)  # conf/report is no group of the experiment
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUP_OPTIONS = [(g, p.stem) for g in GROUPS if g not in PRESET_GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
# The field that names a group's option, for the groups whose files carry one.
NAME_FIELD = {"data": "source", "backbone": "name", "head": "name", "optimizer": "name", "scheduler": "name"}


def _compose(*overrides: str, config_dir: Path = CONF) -> dict:
    return compose(list(overrides), config_dir=config_dir)


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(_compose(*overrides))
    return str(info.value)


# --------------------------------------------------------------------------- params.yaml


def test_params_yaml_is_the_composition_of_conf() -> None:
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == _compose(), "conf/ changed without `python -m transferlab.compose`"


def test_an_edited_conf_no_longer_matches_params_yaml(tmp_path: Path) -> None:
    # The check above is only worth something if an edit to conf/ shows up.
    conf = shutil.copytree(CONF, tmp_path / "conf")
    experiment = conf / "experiment" / "digits_transfer.yaml"
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    epochs = committed["trainer"]["epochs"]
    text = experiment.read_text()
    assert text.count(f"  epochs: {epochs}\n") == 1
    experiment.write_text(text.replace(f"  epochs: {epochs}\n", f"  epochs: {epochs + 1}\n"))
    edited = _compose(config_dir=conf)
    assert edited["trainer"]["epochs"] == epochs + 1
    assert edited != committed


def test_compose_check_passes_in_the_repo() -> None:
    before = (ROOT / "params.yaml").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "transferlab.compose", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "matches" in proc.stdout
    assert (ROOT / "params.yaml").read_bytes() == before


def test_compose_check_fails_for_a_params_file_that_differs(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["optimizer"]["lr"] = 0.123
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    before = out.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "transferlab.compose", "--check", "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "differs from the composition" in proc.stderr
    assert out.read_bytes() == before  # --check never writes


def test_compose_writes_what_check_accepts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # compose's CLI reads conf/ from the working directory
    out = tmp_path / "params.yaml"
    assert compose_main(["--output", str(out), "trainer.epochs=3"]) == 0
    assert yaml.safe_load(out.read_text())["trainer"]["epochs"] == 3
    assert compose_main(["--check", "--output", str(out), "trainer.epochs=3"]) == 0
    assert compose_main(["--check", "--output", str(out)]) == 0  # a composition with overrides (dvc exp run -S)
    assert compose_main(["--check", "--output", str(out), "trainer.epochs=4"]) == 1  # but not of these
    assert compose_main(["--check", "--output", str(tmp_path / "missing.yaml")]) == 1


# --------------------------------------------------------------------------- presets and group options


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment: str, tmp_path: Path) -> None:
    overrides = [f"experiment={experiment}"]
    if experiment == "imagefolder_resnet50":
        overrides.append(f"data.path={tmp_path}")  # validation only checks that a path is set
    cfg = load_config(_compose(*overrides))
    assert isinstance(cfg, ExperimentConfig)
    # The preset's group choices took effect.
    preset = yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text())
    for entry in preset["defaults"]:
        ((key, option),) = entry.items()
        group = key.removeprefix("override /")
        if group in NAME_FIELD:
            assert getattr(getattr(cfg, group), NAME_FIELD[group]) == option, (group, option)


def test_imagefolder_preset_needs_a_path() -> None:
    message = _error("experiment=imagefolder_resnet50")
    assert message.startswith("data.path:")
    assert "one subfolder per class" in message


def test_every_conf_group_is_a_schema_section() -> None:
    sections = {f for f in ExperimentConfig.__dataclass_fields__}
    assert set(GROUPS) - PRESET_GROUPS <= sections


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_validates(group: str, option: str, tmp_path: Path) -> None:
    # Without a preset (`~experiment`) the section is exactly the option's file.
    overrides = [f"{group}={option}", "~experiment"]
    if option == "imagefolder":
        overrides.append(f"data.path={tmp_path}")
    if option == "binary":
        overrides.append("data.classes=[3,8]")  # the binary head needs a 2-class task
    params = _compose(*overrides)
    expected = yaml.safe_load((CONF / group / f"{option}.yaml").read_text())
    if option == "imagefolder":
        expected["path"] = expected["inputs"] = str(tmp_path)  # inputs follows path
    assert params[group] == expected
    load_config(params)


def test_base_config_without_a_preset_validates() -> None:
    cfg = load_config(_compose("~experiment"))
    assert (cfg.backbone.name, cfg.head.name, cfg.backbone.weights) == ("small_cnn", "linear", None)


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("key", ["input", "features", "hidden"])
def test_dropout_must_be_a_probability(key: str) -> None:
    message = _error(f"regularisation.dropout.{key}=1.5")
    assert message.startswith(f"regularisation.dropout.{key}:")
    assert "[0, 1)" in message and "1.5" in message


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("backbone.name=resnet1000", "backbone.name", str(list_backbones())),
        ("head.name=mpl", "head.name", str(list_heads())),
        ("optimizer.name=adamm", "optimizer.name", str(list_optimizers())),
        ("scheduler.name=cosin", "scheduler.name", str(list_schedulers())),
        ("data.source=mnsit", "data.source", "['cifar10', 'digits', 'fashion_mnist', 'imagefolder', 'mnist']"),
    ],
)
def test_unknown_names_list_the_allowed_ones(override: str, key: str, allowed: str) -> None:
    message = _error(override)
    bad = override.partition("=")[2]
    assert message.startswith(f"{key}: Unknown")
    assert f"'{bad}'" in message
    assert f"expected one of {allowed}" in message


def test_the_backbone_list_is_the_conf_group() -> None:
    """Every backbone file names a backbone, and every backbone with an entry of its own has its file."""
    from transferlab.models.backbones import BACKBONES

    names = [yaml.safe_load(p.read_text())["name"] for p in (CONF / "backbone").glob("*.yaml")]
    assert all(name in BACKBONES for name in names)
    assert set(list_backbones()) <= set(names)


@pytest.mark.parametrize(
    ("override", "key", "rule"),
    [
        ("trainer.epochs=0", "trainer.epochs", "must be >= 1, got 0"),
        ("optimizer.lr=0", "optimizer.lr", "must be > 0, got 0.0"),
        ("optimizer.lr=-0.1", "optimizer.lr", "must be > 0, got -0.1"),
        ("regularisation.max_norm.value=0", "regularisation.max_norm.value", "must be > 0, got 0.0"),
        ("regularisation.max_norm.value=-5", "regularisation.max_norm.value", "must be > 0, got -5.0"),
        ("regularisation.freeze.first_n=-1", "regularisation.freeze.first_n", "must be >= 0, got -1"),
        ("trainer.epochs=5 regularisation.freeze.head_only_epochs=5", "regularisation.freeze.head_only_epochs",
         "must be < trainer.epochs (5), got 5"),
        ("trainer.epochs=5 regularisation.freeze.head_only_epochs=9", "regularisation.freeze.head_only_epochs",
         "must be < trainer.epochs (5), got 9"),
        ("optimizer.momentum=0", "optimizer.nesterov", "Nesterov needs optimizer.momentum > 0"),
    ],
)
def test_out_of_range_values(override: str, key: str, rule: str) -> None:
    assert _error(*override.split()) == f"{key}: {rule}"


def test_values_just_inside_the_ranges_validate() -> None:
    cfg = load_config(_compose("regularisation.dropout.hidden=0.0", "regularisation.freeze.first_n=0",
                               "regularisation.freeze.head_only_epochs=14", "trainer.epochs=15",
                               "optimizer.lr=1e-6", "optimizer.momentum=0", "optimizer.nesterov=false"))
    assert cfg.regularisation.freeze.head_only_epochs == 14 and cfg.optimizer.momentum == 0


def test_wrong_type_names_the_key() -> None:
    message = _error("trainer.epochs=abc")
    assert message.startswith("trainer.epochs:")
    assert "'abc'" in message and "Integer" in message


@pytest.mark.parametrize(
    ("override", "full_key", "allowed", "hint"),
    [
        ("+regularisation.dropot=0.3", "regularisation.dropot",
         "['dropout', 'freeze', 'label_smoothing', 'max_norm']", "dropout"),
        ("+regularisation.dropout.hiden=0.3", "regularisation.dropout.hiden",
         "['features', 'hidden', 'input', 'per_layer']", "hidden"),
        ("+trainer.epoch=3", "trainer.epoch", "'epochs'", "epochs"),
    ],
)
def test_unknown_key_lists_allowed_keys_and_suggests(override: str, full_key: str, allowed: str, hint: str) -> None:
    message = _error(override)
    assert f"Unknown key '{full_key}'" in message
    assert allowed in message
    assert f"Did you mean '{hint}'?" in message


def test_unknown_top_level_key() -> None:
    message = _error("+foo=1")
    assert "Unknown key 'foo'" in message and "<root>" in message and "'regularisation'" in message


def test_num_units_only_on_the_overcomplete_head() -> None:
    assert _error("~experiment", "head=mlp", "head.num_units=5") == \
        "head.num_units: head 'mlp' takes no 'num_units'; its keys are ['activations', 'hidden', 'init', 'name']"
    load_config(_compose("~experiment", "head=overcomplete", "head.num_units=5"))


def test_linear_head_has_no_hidden_layers_binary_may() -> None:
    message = _error("~experiment", "head=linear", "head.hidden=[64]")
    assert message.startswith("head.hidden:") and "head=mlp" in message
    cfg = load_config(_compose("~experiment", "head=binary", "head.hidden=[64]", "data.classes=[3,8]"))
    assert cfg.head.hidden == [64]


def test_per_layer_dropout_needs_one_value_per_hidden_layer() -> None:
    # digits_transfer's head has one hidden layer.
    message = _error("regularisation.dropout.per_layer=[0.1,0.2]")
    assert message == ("regularisation.dropout.per_layer: needs one value per head hidden layer (1), got 2")
    assert _error("regularisation.dropout.per_layer=[1.5]").startswith("regularisation.dropout.per_layer[0]:")
    assert load_config(_compose("regularisation.dropout.per_layer=[0.3]")).regularisation.dropout.per_layer == [0.3]


def test_unknown_torchvision_weights_list_the_known_ones() -> None:
    message = _error("backbone=resnet18", "backbone.weights=IMAGENET1K_V9")
    assert message.startswith("backbone.weights: Unknown weights 'IMAGENET1K_V9' for resnet18")
    assert "IMAGENET1K_V1" in message and "DEFAULT" in message
    for name in ("DEFAULT", "IMAGENET1K_V1"):
        assert load_config(_compose("backbone=resnet18", f"backbone.weights={name}")).backbone.weights == name


# --------------------------------------------------------------------------- command-line keys


def test_check_override_keys_rejects_a_misspelled_key() -> None:
    with pytest.raises(ConfigError) as info:
        check_override_keys(["backbone=resnet18", "regularisation.dropot=0.3"], GROUPS)
    message = str(info.value)
    assert "'regularisation.dropot'" in message
    assert "['dropout', 'freeze', 'label_smoothing', 'max_norm']" in message
    assert "Did you mean 'regularisation.dropout'?" in message


def test_check_override_keys_rejects_a_nested_misspelling() -> None:
    with pytest.raises(ConfigError, match=r"Did you mean 'regularisation\.dropout\.hidden'\?"):
        check_override_keys(["regularisation.dropout.hiden=0.3"], GROUPS)
    with pytest.raises(ConfigError, match=r"Allowed keys under '<root>'"):
        check_override_keys(["traner.epochs=3"], GROUPS)


@pytest.mark.parametrize(
    "override",
    [
        "backbone=resnet18",
        "experiment=keras_mlp",
        "+foo=1",
        "~experiment",
        "hydra.verbose=true",
        "hydra.run.dir=/tmp/x",
        "hydra/job_logging=disabled",
        "regularisation.dropout.hidden=0.3",
        "regularisation.freeze.first_n=2",
        "optimizer.lr=0.1",
        "data.classes=[3,8]",
        "seed=1",
    ],
)
def test_check_override_keys_accepts(override: str) -> None:
    check_override_keys([override], GROUPS)


# --------------------------------------------------------------------------- Hydra precedence


def test_cli_group_choice_beats_the_presets_group_override() -> None:
    # digits_transfer says `override /backbone: small_cnn`; a command-line
    # group choice replaces that choice ...
    params = _compose("backbone=resnet18")
    assert params["backbone"]["name"] == "resnet18"
    assert params["backbone"]["channels"] == 3  # from conf/backbone/resnet18.yaml (small_cnn says 1)
    # ... but the preset's own values are still merged on top of the chosen file.
    assert params["backbone"]["weights"] == "source"


def test_preset_values_win_over_the_cli_group_file_but_not_over_cli_values() -> None:
    params = _compose("experiment=keras_mlp", "backbone=resnet18")
    assert params["backbone"]["name"] == "resnet18"
    assert params["backbone"]["input_size"] == 28  # keras_mlp sets it; resnet18.yaml says null
    params = _compose("experiment=keras_mlp", "backbone=resnet18", "backbone.input_size=64")
    assert params["backbone"]["input_size"] == 64
