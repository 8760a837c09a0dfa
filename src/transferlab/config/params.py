"""Reading the composed config (``params.yaml``) that DVC stages run on."""

from __future__ import annotations

from pathlib import Path

import yaml
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
    return load_config(raw)


def to_container(cfg: ExperimentConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
