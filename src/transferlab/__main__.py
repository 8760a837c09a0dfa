"""``python -m transferlab [overrides]``: run one experiment; ``-m`` sweeps.
``python -m transferlab predict MODEL IMAGES...``: predict image files (:mod:`transferlab.predict`).
``python -m transferlab export MODEL --out model.onnx``: an ONNX file (:mod:`transferlab.export`).
``python -m transferlab report [--quick] [overrides]``: each technique against its absence (:mod:`transferlab.report`).

Examples::

    python -m transferlab backbone=resnet18 regularisation.dropout.hidden=0.3
    python -m transferlab -m regularisation.dropout.hidden=0.1,0.3,0.5 backbone=small_cnn,resnet18
    python -m transferlab predict models photos/
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transferlab.config.schema import ExperimentConfig

CONF_DIR = Path("conf")
# transferlab <subcommand> ...: the module whose main(argv) runs it.
SUBCOMMANDS = {"predict": "transferlab.predict", "export": "transferlab.export", "report": "transferlab.report"}


def _groups(conf_dir: Path) -> list[str]:
    from transferlab.compose import config_groups

    return config_groups(conf_dir)


def main() -> None:
    # Subcommands: never a Hydra override (those hold '='), nor a flag.
    if sys.argv[1:2] and sys.argv[1] in SUBCOMMANDS:
        import importlib

        importlib.import_module(SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:])
        return
    import hydra
    from hydra._internal.utils import get_args_parser
    from omegaconf import DictConfig

    from transferlab.cli import guarded
    from transferlab.config.validate import check_override_keys

    conf_dir = CONF_DIR.resolve()
    if not (conf_dir / "config.yaml").is_file():
        print(f"error: no conf/config.yaml under {Path.cwd()}: run from the project root", file=sys.stderr)
        raise SystemExit(2)
    register_resolvers()
    # The parser hydra.main uses (Hydra 1.3 keeps it internal): its flags and their values (-sc install=bash,
    # -c job, -p trainer) are not overrides, and the modes that only show something run no job.
    args = get_args_parser().parse_args(sys.argv[1:])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _torchrun_job(args)
    shows_only = args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
    other_config = args.config_path or args.config_name or args.config_dir or args.experimental_rerun
    if not (shows_only or other_config):
        # Check before Hydra creates a run folder, so a bad value leaves nothing behind; a sweep checks every
        # job before the first one starts.
        guarded(lambda: check_override_keys(args.overrides, _groups(conf_dir)))
        if args.multirun:
            guarded(lambda: _validate_sweep(args.overrides, conf_dir))
        else:
            guarded(lambda: _validate_composition(args.overrides, conf_dir))

    @hydra.main(version_base="1.3", config_path=str(conf_dir), config_name="config")
    def app(cfg: DictConfig) -> float:
        return guarded_experiment(cfg)

    from transferlab.tracking.sweep import close_sweep

    try:
        app()
    except BaseException as err:
        close_sweep(err)  # a failed or killed job stops the sweep: its parent run must not stay RUNNING
        raise


def register_resolvers() -> None:
    """``${uid:}``: a short random id, the same wherever one config resolves it (``use_cache``; Hydra copies
    the cache into each sweep job's config). Run and sweep folders are named by time, then this id: sortable,
    and distinct for runs started in the same second."""
    import secrets

    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(3), use_cache=True, replace=True)


def _validate_composition(overrides: list[str], conf_dir: Path, *, tracking: bool = True) -> "ExperimentConfig | None":
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from transferlab.compose import compose
    from transferlab.config.preflight import preflight
    from transferlab.config.validate import load_config

    try:
        params = compose(overrides, config_dir=conf_dir)
    except (HydraException, OmegaConfBaseException):
        return None  # Hydra reports its own composition errors (with the available options) next
    cfg = load_config(params)
    preflight(cfg, tracking=tracking)
    return cfg


MAX_PRECHECKED_JOBS = 256


def _validate_sweep(overrides: list[str], conf_dir: Path) -> None:
    """Compose and check each job of a basic sweep (comma lists, ranges)."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
    except ImportError:  # Hydra internals moved: the jobs still validate themselves
        return
    try:
        jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]
    except Exception:
        return  # Hydra reports bad override syntax itself
    from transferlab.tracking.preflight import check_tracking

    # Every job's config first, then each distinct tracking setup: a bad job must not find a store made.
    configs = [_validate_composition(list(job), conf_dir, tracking=False) for job in jobs[:MAX_PRECHECKED_JOBS]]
    checked = set()
    for cfg in filter(None, configs):
        setup = (cfg.tracking.uri, cfg.tracking.experiment, cfg.backbone.weights)
        if setup not in checked:
            checked.add(setup)
            check_tracking(cfg)


def _torchrun_job(args: Any) -> None:
    """Under ``torchrun`` every process runs the app as one job: rank 0's Hydra folder is the run's, and
    the other ranks' Hydra folders go to a temporary directory (they write nothing the run keeps)."""
    if args.multirun:
        print("error: -m/--multirun under torchrun: a sweep runs its jobs one process each; start "
              "torchrun once per experiment instead", file=sys.stderr)
        raise SystemExit(2)
    if int(os.environ.get("RANK", "0")) > 0:
        import atexit
        import shutil
        import tempfile

        scratch = tempfile.mkdtemp(prefix=f"transferlab-rank{os.environ['RANK']}-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


def guarded_experiment(cfg: "DictConfig") -> float:  # noqa: F821
    from transferlab.cli import guarded

    result: dict = {}
    guarded(lambda: result.update(experiment(cfg)))
    # The sweep's objective: a validation metric (config key optimized_metric), never a test one.
    return float(result[cfg.optimized_metric])


def experiment(cfg: "DictConfig") -> dict:  # noqa: F821
    """One job: validate, then run the pipeline under Hydra's output folder."""
    from dataclasses import replace

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from transferlab.config.preflight import preflight
    from transferlab.config.validate import load_config
    from transferlab.pipeline import run_pipeline, with_output_dir

    from transferlab.training.distributed import broadcast, context
    from transferlab.training.runtime import resolve_device

    exp = load_config(cfg)
    preflight(exp)  # again in the job: a sweeper that picks values as it goes (Optuna) was not pre-checked
    hc = HydraConfig.get()
    out = Path(broadcast(hc.runtime.output_dir, context(resolve_device(exp.trainer.device))))  # torchrun: rank 0's
    tags = {"launcher": "hydra", "overrides": " ".join(hc.overrides.task) or "(none)"}
    if hc.mode == RunMode.MULTIRUN:
        from transferlab.tracking.sweep import finished_job, parent_run_id, record_finished_job

        done = finished_job(out, list(hc.overrides.task))
        if done is not None:
            print(f"sweep job {hc.job.num}: finished earlier (MLflow run {done['run_id']}); skipped")
            return done
        sweep = Path(hc.sweep.dir).name
        tags.update({"sweep": sweep, "sweep_dir": str(hc.sweep.dir), "sweep_job": str(hc.job.num)})
        parent = parent_run_id(hc.sweep.dir)
        if parent:
            tags["mlflow.parentRunId"] = parent
        if exp.tracking.run_name is None:
            exp.tracking.run_name = f"sweep-{sweep}-{hc.job.num}"
        exp.tracking.register = None  # the sweep registers its best job's model when it ends (tracking/sweep.py)
    exp = with_output_dir(exp, out)
    if hc.mode != RunMode.MULTIRUN:
        return run_pipeline(exp, tags=tags)
    from transferlab.devices import job_device

    # Jobs that run at once (hydra/launcher=parallel) each train on a GPU of their own.
    with job_device(exp.trainer.device, hc.job.num) as device:
        result = run_pipeline(replace(exp, trainer=replace(exp.trainer, device=device)), tags=tags)
    record_finished_job(out, list(hc.overrides.task), result)
    return result


if __name__ == "__main__":
    main()
