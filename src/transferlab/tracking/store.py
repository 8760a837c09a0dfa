"""Where the MLflow store is, and making sure it exists before any work.

:func:`tracking_uri` is the one place that decides the URI: an explicit
``MLFLOW_TRACKING_URI`` in the environment wins over ``tracking.uri``, and a
relative SQLite path (the default ``sqlite:///mlflow.db``) is resolved against
the project root, not the current directory. The project root is ``DVC_ROOT``
when DVC runs the stage (for queued and ``--temp`` experiments DVC points it
at the parent repository, so their runs land in the project's store rather
than in a temporary copy that DVC deletes), else the current directory.

:func:`ensure_store` creates or migrates a SQLite store so that an
interruption cannot leave it half-made: a new store is built and migrated in a
temporary file next to it and renamed into place, all under an exclusive file
lock so parallel first runs don't race. MLflow's SQLite migrations are not
transactional (mlflow/mlflow#23721), so a store that an older version left
half-migrated is detected and repaired, or refused with what to do.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path
from urllib.parse import urlparse

from transferlab.errors import TrackingError
from transferlab.project import project_root, state_dir

# Artifacts of a SQLite store live in this folder next to the database file.
ARTIFACTS_DIR = "mlruns"
# Reachability probes of a tracking server: short, so a dead server fails fast.
PROBE_TIMEOUT_S = 3.0


def tracking_uri(configured: str) -> str:
    """The store every run, sweep and weights look-up uses (see the module doc)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        return f"sqlite:///{project_root() / path}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative as written), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def is_http(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def artifact_root(uri: str) -> str | None:
    """Where a SQLite store's runs keep their artifacts: ``mlruns/`` beside the database."""
    path = sqlite_path(uri)
    return None if path is None else str(path.parent / ARTIFACTS_DIR)


def reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the store answers now: a server's ``/health`` within ``timeout``; local stores always."""
    if not is_http(uri):
        return True
    import requests

    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def ensure_store(uri: str, experiment: str) -> str:
    """Make the store usable and the experiment present; return the experiment's id.

    ``uri`` is a resolved URI (:func:`tracking_uri`). Raises TrackingError for a
    server that does not answer or a store that cannot be repaired safely.
    """
    path = sqlite_path(uri)
    if path is not None:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        # Everything that creates or changes the schema or creates the experiment
        # runs under this lock: parallel first runs find one finished store.
        with FileLock(f"{path}.lock"):
            _ensure_sqlite(path)
            return _ensure_experiment(uri, experiment)
    if is_http(uri) and not reachable(uri):
        raise TrackingError(
            f"tracking.uri={uri}: no MLflow tracking server answers there (checked {uri.rstrip('/')}/health, "
            f"{PROBE_TIMEOUT_S:.0f} s timeout). Start one, e.g. `mlflow server --host 127.0.0.1 --port "
            f"{urlparse(uri).port or 5000}`, or use the local store: tracking=sqlite")
    return _ensure_experiment(uri, experiment)


def _ensure_experiment(uri: str, experiment: str) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    root = artifact_root(uri)
    try:
        if root is None:
            return client.create_experiment(experiment)
        # MLflow would put the artifacts under the *current* directory's mlruns/;
        # the store's own constructor takes the root, and names the folder by id.
        return _sqlite_store(uri).create_experiment(experiment)
    except MlflowException:  # created meanwhile by another process (server stores lock nothing)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def _sqlite_store(uri: str):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    return SqlAlchemyStore(uri, artifact_root(uri))


def _head_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _revision(path: Path) -> str | None:
    """The schema revision a SQLite store records (None: no MLflow schema at all)."""
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "alembic_version" not in tables:
            return None
        row = db.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def _run_count(path: Path) -> int:
    try:
        with sqlite3.connect(path) as db:
            return int(db.execute("SELECT count(*) FROM runs").fetchone()[0])
    except sqlite3.Error:
        return 0


def _ensure_sqlite(path: Path) -> None:
    # Temporary stores of runs killed while building one (we hold the lock: no one builds now).
    for stale in path.parent.glob(f"{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    if path.is_file() and path.stat().st_size > 0 and _revision(path) == _head_revision():
        return
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if path.is_file() and path.stat().st_size > 0:
        shutil.copy2(path, tmp)  # an older schema: migrate a copy, never the store itself
    try:
        _build(tmp, artifact_root(f"sqlite:///{path}"))
    except Exception as err:
        tmp.unlink(missing_ok=True)
        if not path.is_file():
            raise
        _repair(path, err)
    else:
        os.replace(tmp, path)  # the store appears whole or not at all
        _forget_connections(path)
    finally:
        tmp.unlink(missing_ok=True)  # interrupted (Ctrl-C, SIGTERM): no half-made store anywhere


def _forget_connections(path: Path) -> None:
    """Close this process's pooled connections to the file that was at ``path``: they
    would keep reading the replaced file. The engine reconnects on next use."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = SqlAlchemyStore._engine_map.get(f"sqlite:///{path}")
    if engine is not None:
        engine.dispose()


def _build(db: Path, artifacts: str) -> None:
    """Create (or migrate) the MLflow schema in ``db``, then close every connection to it."""
    from mlflow.store.db.utils import _initialize_tables, _upgrade_db, create_sqlalchemy_engine

    engine = create_sqlalchemy_engine(f"sqlite:///{db}")
    try:
        if _revision(db) is None:
            _initialize_tables(engine)
        else:
            _upgrade_db(engine)
    finally:
        engine.dispose()
    # The default experiment, with its artifacts beside the final database file.
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"sqlite:///{db}", artifacts)
    store.engine.dispose()
    SqlAlchemyStore._engine_map.pop(f"sqlite:///{db}", None)


def _repair(path: Path, err: Exception) -> None:
    """A store whose migration fails: half-migrated by an interrupted older version."""
    detail = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    runs = _run_count(path)
    if runs == 0:
        aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        _forget_connections(path)
        print(f"tracking: {path} was half-created by an interrupted first run ({detail}) and holds no runs; "
              f"moved it to {aside.name} and created a new store")
        _ensure_sqlite(path)
        return
    raise TrackingError(
        f"tracking.uri=sqlite:///{path}: this store cannot be migrated ({detail}); an earlier migration was "
        f"interrupted (MLflow's SQLite migrations are not transactional). It holds {runs} runs, so it is left "
        f"as it is. Back it up (cp {path} {path}.bak), then either restore a backup made before the upgrade "
        f"and run `mlflow db upgrade sqlite:///{path}`, or move it aside (mv {path} {path}.old) to start a new "
        "store; the old runs stay readable with the MLflow version that wrote them.")
