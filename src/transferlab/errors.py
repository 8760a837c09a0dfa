"""The errors a user can fix from the message alone.

A leaf module: every part of the package raises these, and the command line
(:mod:`transferlab.cli`) turns them into one ``error: ...`` line and exit 2.
Each message names the config key or the file, and what is allowed.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid experiment config; the message names the key and what is allowed."""


class DataError(ValueError):
    """Bad data or data that cannot be had; the message says what and where."""


class HeadError(ValueError):
    """A head that does not fit the task."""


class WeightsError(ValueError):
    """Weights that cannot be had or do not fit; the message says what to do."""


class FreezeError(ValueError):
    """A freezing request that does not fit the model."""


class TrackingError(ValueError):
    """A tracking store or server that cannot be used; the message says which and why."""


class ExportError(ValueError):
    """A model export that cannot be done as asked (a missing exporter, a bad argument)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, HeadError, WeightsError, FreezeError, TrackingError, ExportError, FloatingPointError,
)
