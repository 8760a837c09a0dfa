"""Compose ``conf/`` into ``params.yaml``, the file every DVC stage reads.

``python -m transferlab.compose [overrides...]`` writes it;
``--check`` exits non-zero unless the file is a composition of the current
conf/ (with any overrides: ``dvc exp run -S`` and ``dvc exp branch`` results
pass), left as composed. DVC does the same composition itself on
``dvc exp run -S key=value``; both record how (``composition``, see
:mod:`hydra_plugins.transferlab_composition`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml
from hydra_plugins import transferlab_composition as composition
from omegaconf import DictConfig, OmegaConf, open_dict

from transferlab.config.validate import ConfigError, load_config

HEADER = "# Composed from conf/ by `python -m transferlab.compose`; edit conf/, not this file.\n"


def config_groups(conf_dir: str | Path = "conf") -> list[str]:
    """The experiment's config groups: conf/'s folders, less those no composition reads (conf/report)."""
    return sorted(p.name for p in Path(conf_dir).iterdir() if p.is_dir() and p.name not in composition.NOT_COMPOSED)


def compose(overrides: list[str] | None = None, *, config_dir: str | Path = "conf",
            config_name: str = "config") -> dict:
    """The composed config as plain data (as DVC writes it), with its ``composition`` record."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hydra.errors import ConfigCompositionException

    config_dir = Path(config_dir).resolve()
    if not (config_dir / f"{config_name}.yaml").is_file():
        raise ConfigError(f"no {config_name}.yaml in {config_dir}: run from the project root")
    overrides = list(overrides or [])
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except ConfigCompositionException as err:
        _explain_option_key(err, overrides, config_dir, config_name)
        raise
    with open_dict(cfg):
        cfg.pop(composition.KEY, None)  # its resolver would digest ./conf: the record names config_dir
    params: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    params[composition.KEY] = composition.record(config_dir, params)
    return params


def _explain_option_key(err: Exception, overrides: list[str], config_dir: Path, config_name: str) -> None:
    """Hydra refuses ``optimizer.betas=...`` when the chosen optimizer has no such key; say
    which choice is in force and the keys it takes (a ConfigError), else leave Hydra's error."""
    from transferlab.config.validate import check_option_keys

    match = re.match(r"Could not override '([\w.]+)'", str(err))
    if not match or "." not in match.group(1):
        return
    failing = [o for o in overrides if o.partition("=")[0] == match.group(1)]
    try:
        params = compose([o for o in overrides if o not in failing], config_dir=config_dir, config_name=config_name)
    except Exception:  # noqa: BLE001 - the other overrides fail too: Hydra's own error says more
        return
    group, _, key = match.group(1).rpartition(".")
    node = OmegaConf.select(OmegaConf.create(params), group, default=None)
    if isinstance(node, DictConfig):
        OmegaConf.update(node, key, None, force_add=True)
        only = OmegaConf.create()
        OmegaConf.update(only, group, node, force_add=True)
        check_option_keys(only)


def render(params: dict) -> str:
    return yaml.safe_dump(params, sort_keys=False, default_flow_style=False)


def check(path: Path, expected: dict | None = None, conf_dir: Path = Path("conf")) -> None:
    """Refuse ``path`` unless it is a composition of the current ``conf_dir`` left as composed
    (and equal to ``expected``, the composition with given overrides, when given)."""
    from transferlab.config.params import check_fresh

    if not path.is_file():
        raise ConfigError(f"{path} not found: run `python -m transferlab.compose`")
    current = yaml.safe_load(path.read_text())
    record = composition.recorded(current) if isinstance(current, dict) else None
    if record is None:
        raise ConfigError(f"{path} is not a composition of conf/ (no `{composition.KEY}` record): "
                          "run `python -m transferlab.compose`")
    check_fresh(current, path, conf_dir)
    if composition.params_digest(current) != record["params"]:
        differ = "; ".join(composition.changed_keys(compose(config_dir=conf_dir), current))
        raise ConfigError(f"{path} differs from the composition it records: it was edited by hand since "
                          f"(values that differ from conf/: {differ or 'none'}). Move the edits into conf/ or "
                          "pass them with `dvc exp run -S`, then run `python -m transferlab.compose`")
    if expected is not None and composition.changed_keys(current, expected):
        raise ConfigError(f"{path} differs from the composition of conf/ with these overrides: "
                          + "; ".join(composition.changed_keys(current, expected)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. backbone=resnet18")
    parser.add_argument("--output", default="params.yaml")
    parser.add_argument("--check", action="store_true", help="fail unless the output is a composition of the current conf/ "
                        "(of these overrides, when given), left as composed")
    args = parser.parse_args(argv)
    try:
        params = compose(args.overrides)
        load_config(params)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.output)
    if args.check:
        try:
            check(out, params if args.overrides else None)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"{out} matches conf/")
        return 0
    out.write_text(HEADER + render(params))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
