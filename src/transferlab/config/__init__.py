"""Experiment schema, validation and composition."""

from transferlab.config.schema import ExperimentConfig
from transferlab.config.validate import ConfigError, check_override_keys, load_config

__all__ = ["ConfigError", "ExperimentConfig", "check_override_keys", "load_config"]
