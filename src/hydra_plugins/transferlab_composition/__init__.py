"""How ``params.yaml`` was composed: the ``composition`` record and its resolver.

``conf/config.yaml`` sets ``composition: ${transferlab_composition:}``; the
resolver fills it with two digests: ``conf``, of conf/'s files, and ``params``,
of the rest of the composed config. A stage then knows when conf/ changed
after the composition (stale) and ``--check`` knows when params.yaml was
edited by hand since (its content no longer matches ``params``).

This is a Hydra plugin package, so that DVC's own composition
(``dvc exp run -S``, which never imports ``transferlab``) registers the
resolver too: DVC loads Hydra plugins from ``hydra.plugins_path`` before it
composes, and Hydra scans ``hydra_plugins`` on ``sys.path`` in every other
process. It needs only the standard library, OmegaConf and PyYAML.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

KEY = "composition"
RESOLVER = "transferlab_composition"


# conf/'s folders that are not part of the experiment's composition: `transferlab report`'s configs.
NOT_COMPOSED = ("report",)


def conf_digest(conf_dir: str | Path) -> str:
    """sha256 over conf/'s files (relative path and content), whatever their location; the folders of
    :data:`NOT_COMPOSED` aside, so that editing them leaves ``params.yaml`` current."""
    conf_dir = Path(conf_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in conf_dir.rglob("*")
                       if p.is_file() and p.relative_to(conf_dir).parts[0] not in NOT_COMPOSED):
        digest.update(path.relative_to(conf_dir).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def params_digest(params: Mapping[str, Any]) -> str:
    """sha256 of the composed values (the record itself left out), as YAML loads them back."""
    rest = {k: v for k, v in params.items() if k != KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def record(conf_dir: str | Path, params: Mapping[str, Any]) -> dict[str, str]:
    return {"conf": conf_digest(conf_dir), "params": params_digest(params)}


def recorded(params: Mapping[str, Any]) -> dict | None:
    """The record a composed config carries, if it carries one."""
    rec = params.get(KEY)
    return rec if isinstance(rec, Mapping) and {"conf", "params"} <= rec.keys() else None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        return {k: v for key, node in tree.items() for k, v in flatten(node, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def changed_keys(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """``key: before -> after`` for each dotted key whose value differs (the record left out)."""
    old = flatten({k: v for k, v in before.items() if k != KEY})
    new = flatten({k: v for k, v in after.items() if k != KEY})
    missing = "(absent)"
    return [f"{k}: {old.get(k, missing)} -> {new.get(k, missing)}"
            for k in sorted(old.keys() | new.keys()) if old.get(k, missing) != new.get(k, missing)]


def _resolve(*, _root_: DictConfig) -> DictConfig:
    rest = {}
    for key in _root_:
        if key != KEY:
            node = _root_[key]
            rest[key] = OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
    dvc = _dvc_composition()
    conf_dir = Path(dvc["config_dir"]) if dvc and dvc.get("config_dir") else Path("conf")
    if dvc:
        _refuse_to_discard_hand_edits(Path(dvc["output_file"]), rest, dvc.get("overrides") or [])
    return OmegaConf.create(record(conf_dir, rest))  # a resolver's mapping must be a node


def _dvc_composition() -> dict | None:
    """The arguments of DVC's ``compose_and_dump`` when DVC is composing (``dvc exp run -S``), else None.

    DVC offers no hook around its composition; its frame is the only sign that the
    composed config is about to overwrite ``output_file``."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "compose_and_dump" and frame.f_globals.get("__name__") == "dvc.utils.hydra":
            return frame.f_locals
        frame = frame.f_back
    return None


def _refuse_to_discard_hand_edits(output: Path, composed: Mapping[str, Any], overrides: list[str]) -> None:
    """Stop ``dvc exp run -S`` before it overwrites a hand-edited params.yaml, naming what it would discard."""
    try:
        current = yaml.safe_load(output.read_text())
    except (OSError, yaml.YAMLError):
        return
    rec = recorded(current) if isinstance(current, Mapping) else None
    if rec is None or params_digest(current) == rec["params"]:
        return
    keys = [o.lstrip("+~").partition("=")[0] for o in overrides]
    lost = [line for line in changed_keys(current, composed)
            if not any(line == k or line.startswith((f"{k}:", f"{k}.")) for k in keys)]
    listed = "".join(f"\n  {line}" for line in lost) or " (none of its values: only the -S keys changed)"
    # SystemExit passes through OmegaConf's resolution unwrapped; DVC unwinds its stash and leaves
    # the workspace, params.yaml included, as it was.
    raise SystemExit(
        f"ERROR: {output} was edited by hand since it was composed, and `dvc exp run -S` recomposes it from "
        f"conf/ and the -S values, which would discard:{listed}\n"
        f"Move these values into conf/ or pass them with -S (e.g. -S key=value); {output} is left as it is.")


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, _resolve)
