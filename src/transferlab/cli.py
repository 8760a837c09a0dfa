"""Entry-point glue: expected errors become one clear line and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

from transferlab.config.validate import ConfigError

# Errors a user can fix from the message alone; anything else keeps its traceback.
def user_errors() -> tuple[type[BaseException], ...]:
    from transferlab.data import DataError
    from transferlab.models.heads import HeadError
    from transferlab.models.weights import WeightsError
    from transferlab.training.freezing import FreezeError

    return ConfigError, DataError, HeadError, WeightsError, FreezeError


def guarded(main: Callable[[], None]) -> None:
    try:
        main()
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
