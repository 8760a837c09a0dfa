"""Reading the composed config (``params.yaml``) that DVC stages run on."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from transferlab.config.schema import ExperimentConfig
from transferlab.config.validate import ConfigError, load_config


def read_params(path: str | Path = "params.yaml") -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root, or compose it with "
                          "`python -m transferlab.compose`")
    return load_config(OmegaConf.load(path))


def to_container(cfg: ExperimentConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
