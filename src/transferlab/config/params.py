"""Reading the composed config (``params.yaml``) that DVC stages run on."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Mapping

import yaml
from hydra_plugins import transferlab_composition as composition
from omegaconf import DictConfig, OmegaConf

from transferlab.config.schema import ExperimentConfig
from transferlab.config.validate import ConfigError, load_config


def read_params(path: str | Path = "params.yaml") -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root, or compose it with "
                          "`python -m transferlab.compose`")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(raw).__name__}")
    check_fresh(raw, path, path.parent / "conf")
    return load_config(raw)


def check_fresh(params: Mapping[str, Any], path: Path, conf_dir: Path) -> None:
    """Refuse a composition of an earlier ``conf_dir`` (when it records one and ``conf_dir`` exists)."""
    record = composition.recorded(params)
    if record is not None and conf_dir.is_dir() and record["conf"] != composition.conf_digest(conf_dir):
        raise ConfigError(f"{conf_dir}/ changed since {path} was composed: run `python -m transferlab.compose` "
                          "(or `dvc exp run -S ...`)")


def to_container(cfg: ExperimentConfig) -> dict:
    """The config as plain data, each group with only the keys its choice takes (as params.yaml has it)."""
    from transferlab.config.validate import option_keys, option_registries

    tree: dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[assignment]
    for group in option_registries():
        *parents, leaf = group.split(".")
        parent = tree
        for part in parents:
            parent = parent[part]
        node = parent[leaf]
        keys = option_keys(group, node["name"])
        if keys is not None:
            parent[leaf] = {k: v for k, v in node.items() if k in keys}
    return tree


def restore_command() -> str | None:
    """In a ``dvc exp run`` in the workspace (not ``--temp``/``--queue``, which run in a copy): the
    command that puts back the last commit's params.yaml, dvc.lock and pipeline outputs."""
    root = os.environ.get("DVC_ROOT")
    if not os.environ.get("DVC_EXP_NAME") or not root or Path(root).resolve() != Path.cwd().resolve():
        return None
    stages = (yaml.safe_load(Path("dvc.yaml").read_text()) or {}).get("stages", {})
    outs = [next(iter(o)) if isinstance(o, dict) else o
            for stage in stages.values() for kind in ("outs", "metrics", "plots") for o in stage.get(kind, [])]
    # The outputs git tracks (cache: false); `dvc checkout` restores the cached ones.
    tracked = subprocess.run(["git", "ls-files", "--", "params.yaml", "dvc.lock", *outs],
                             capture_output=True, text=True).stdout.split()
    return f"git checkout HEAD -- {' '.join(tracked)} && dvc checkout" if tracked else "dvc checkout"
