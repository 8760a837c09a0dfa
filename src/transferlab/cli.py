"""Entry-point glue: expected errors become one clear line and exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from transferlab.errors import USER_ERRORS


# Errors a user can fix from the message alone; anything else keeps its traceback.
def user_errors() -> tuple[type[BaseException], ...]:
    return USER_ERRORS


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def handle_sigterm() -> None:
    """SIGTERM (``kill``, SLURM, ``dvc queue kill``) unwinds like Ctrl-C: runs end
    KILLED with their checkpoint logged instead of being left RUNNING."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def guarded(main: Callable[[], None]) -> None:
    handle_sigterm()
    try:
        main()
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def log_to_stdout() -> None:
    """The project's log lines (one per epoch outside a terminal) on stdout, as Hydra's app has them."""
    import logging

    logger = logging.getLogger("transferlab")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def stage_main(run: Callable[[Any], object], doc: str, argv: list[str] | None = None) -> None:
    """A DVC stage's command line: read ``params.yaml``, validate, check what needs no training, run."""
    from transferlab.config.params import read_params
    from transferlab.config.preflight import preflight

    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="the composed config (default: params.yaml)")
    args = parser.parse_args(argv)
    log_to_stdout()

    def checked_run() -> None:
        cfg = read_params(args.params)
        preflight(cfg)
        run(cfg)

    try:
        guarded(checked_run)
    except BaseException:
        from transferlab.config.params import restore_command

        if hint := restore_command():
            print(f"The experiment failed; DVC leaves params.yaml recomposed and this stage's outputs deleted. "
                  f"Restore the workspace to the last commit with:\n  {hint}", file=sys.stderr)
        raise
