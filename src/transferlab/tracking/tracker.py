"""One MLflow run as the stages see it: start or resume, log, end.

Logging never blocks training. Each record (params, metrics, tags, artifacts,
the final status) is appended to a spool folder,
``.transferlab/spool/<run id>/``, and a background thread sends it to the
store in order. When the store stops answering (a tracking server that died),
the thread waits and probes it every second, and sends the backlog when it
answers again. When the run ends, :meth:`Tracker.end` waits briefly for a
silent server; whatever is still unsent stays in the spool and
``python -m transferlab.tracking replay <folder>`` sends it later (the
command is printed). Replaying is idempotent: MLflow keeps one copy of a
metric logged twice with the same step and timestamp, params and tags are
rewritten with the same values.

MLflow's own async logging keeps its queue in memory and its HTTP retries
block a call for minutes, so neither survives a server that dies mid-run;
hence this writer.

Runs carry the host, pid and process start time that owns them
(``transferlab.*`` tags). A run started in an experiment first ends as KILLED
every RUNNING run of that experiment whose process on this host is gone
(SIGKILL, power loss), sweep parents included.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from transferlab.project import state_dir
from transferlab.tracking.store import ensure_store, reachable, tracking_uri

RECORDS = "records.jsonl"
HEADER = "run.json"
RETRY_S = 1.0  # probe interval while the store is silent
GRACE_S = 10.0  # how long end() waits for a silent store before leaving the rest in the spool
STALL_S = 300.0  # how long end() waits on a store that answers but makes no progress

TAG_HOST, TAG_PID, TAG_STARTED = "transferlab.host", "transferlab.pid", "transferlab.pid_started"

STATUSES = ("FINISHED", "FAILED", "KILLED")


def status_of(error: BaseException | None) -> str:
    """The final status for how a block ended: Ctrl-C and SIGTERM are KILLED."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def process_tags() -> dict[str, str]:
    import psutil

    me = psutil.Process()
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(me.pid), TAG_STARTED: repr(me.create_time())}


def _alive(pid: int, started: float) -> bool:
    import psutil

    try:
        # A recycled pid belongs to a process started later.
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def end_dead_runs(uri: str, experiment_id: str) -> list[str]:
    """End as KILLED the RUNNING runs of this experiment owned by a dead process of this host."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    host = socket.gethostname().replace("'", "")
    runs = client.search_runs([experiment_id], max_results=1000,
                              filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = '{host}'")
    ended = []
    for run in runs:
        tags = run.data.tags
        try:
            pid, started = int(tags[TAG_PID]), float(tags[TAG_STARTED])
        except (KeyError, ValueError):
            continue
        if not _alive(pid, started):
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    if ended:
        print(f"tracking: ended {len(ended)} run(s) left RUNNING by a killed process as KILLED: {', '.join(ended)}")
    return ended


def fresh_run_name() -> str:
    """An MLflow-style name (``brave-owl-123``) drawn from the OS, not the seeded ``random``."""
    import random

    from mlflow.utils.name_utils import _GENERATOR_NOUNS, _GENERATOR_PREDICATES

    rng = random.SystemRandom()
    return f"{rng.choice(_GENERATOR_PREDICATES)}-{rng.choice(_GENERATOR_NOUNS)}-{rng.randrange(1000)}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def apply(client: Any, run_id: str, record: Mapping[str, Any], folder: Path) -> None:
    """Send one spooled record to the store."""
    from mlflow.entities import Metric, Param, RunTag

    op = record["op"]
    if op == "params":
        items = [Param(k, v) for k, v in record["params"].items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i:i + 100])
    elif op == "tags":
        items = [RunTag(k, v) for k, v in record["tags"].items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, tags=items[i:i + 100])
    elif op == "metrics":
        items = [Metric(k, float(v), record["timestamp"], record["step"]) for k, v in record["metrics"].items()]
        for i in range(0, len(items), 1000):
            client.log_batch(run_id, metrics=items[i:i + 1000])
    elif op == "artifact":
        client.log_artifact(run_id, str(folder / record["file"]), record["artifact_path"])
    elif op == "status":
        if record["status"] == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, record["status"], record["end_time"])
    else:
        raise ValueError(f"unknown spool record {op!r}")


class _Writer(threading.Thread):
    """Sends queued records in order; waits out a silent store."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__(name=f"mlflow-writer-{tracker.run_id[:8]}", daemon=True)
        from mlflow import MlflowClient

        self.tracker = tracker
        self.client = MlflowClient(tracker.uri)
        self.queue: deque[dict[str, Any]] = deque()
        self.cv = threading.Condition()
        self.closing = False
        self.online = True
        self.sent = 0

    def put(self, record: dict[str, Any]) -> None:
        with self.cv:
            self.queue.append(record)
            self.cv.notify_all()

    def run(self) -> None:
        t = self.tracker
        while True:
            with self.cv:
                while not self.queue and not self.closing:
                    self.cv.wait()
                if not self.queue:
                    return
                record = self.queue[0]
            if not self.online:
                if not reachable(t.uri):
                    time.sleep(RETRY_S)
                    continue
                self.online = True
                print(f"tracking: the store at {t.uri} answers again; sending the backlog", file=sys.stderr)
            try:
                if record["op"] == "call":
                    record["fn"]()
                else:
                    apply(self.client, t.run_id, record, t.folder)
            except Exception as err:
                if not reachable(t.uri):
                    self.online = False
                    print(f"tracking: the store at {t.uri} does not answer; training goes on, records are kept "
                          f"in {t.folder}", file=sys.stderr)
                    continue
                print(f"tracking: warning: could not record {record['op']} for run {t.run_id} "
                      f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})",
                      file=sys.stderr)
            with self.cv:
                self.queue.popleft()
                self.sent += 1
                self.cv.notify_all()

    def drain(self) -> list[dict[str, Any]]:
        """Wait until everything is sent, the store stays silent GRACE_S, or it stalls; return the rest."""
        with self.cv:
            self.closing = True
            self.cv.notify_all()
        uri = self.tracker.uri
        last_sent, progress_at, silent_since = self.sent, time.monotonic(), None
        while True:
            with self.cv:
                if not self.queue:
                    return []
                self.cv.wait(0.5)
                now = time.monotonic()
                if self.sent != last_sent:
                    last_sent, progress_at = self.sent, now
                rest = list(self.queue)
            if not rest:
                return []
            if self.online and reachable(uri, timeout=1.0):
                silent_since = None
            else:
                silent_since = silent_since or now
            if (silent_since is not None and now - silent_since > GRACE_S) or now - progress_at > STALL_S:
                return rest


class Tracker:
    """A run being recorded: params, metrics, tags, artifacts, then one final status."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.folder = state_dir("spool") / run_id
        (self.folder / "files").mkdir(parents=True, exist_ok=True)
        (self.folder / HEADER).write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}))
        self._lock = threading.Lock()
        self._files = sum(1 for _ in (self.folder / "files").iterdir())
        self._ended = False
        self._writer = _Writer(self)
        records = self.folder / RECORDS
        if records.is_file():  # left by an earlier process of this run (a silent store): send them first
            for line in records.read_text().splitlines():
                self._writer.put(json.loads(line))
        self._writer.start()

    @classmethod
    def start(cls, *, uri: str, experiment: str, run_name: str | None = None,
              tags: Mapping[str, str] | None = None) -> "Tracker":
        """A new run in ``experiment`` (``uri`` as configured; :func:`tracking_uri` resolves it)."""
        from mlflow import MlflowClient

        uri = tracking_uri(uri)
        experiment_id = ensure_store(uri, experiment)
        end_dead_runs(uri, experiment_id)
        run = MlflowClient(uri).create_run(experiment_id, run_name=run_name or fresh_run_name(),
                                           tags={**(tags or {}), **process_tags()})
        return cls(uri, run.info.run_id)

    @classmethod
    def resume(cls, *, uri: str, run_id: str) -> "Tracker":
        """Reopen a run (the evaluate stage adds to finetune's); needs no answer from the store."""
        tracker = cls(tracking_uri(uri), run_id)
        tracker.set_tags(process_tags())  # before RUNNING: a live owner is never taken for dead
        tracker._put({"op": "status", "status": "RUNNING"})
        return tracker

    # --- records ---------------------------------------------------------------------------------------------

    def _put(self, record: dict[str, Any]) -> None:
        if self._ended:
            raise RuntimeError(f"run {self.run_id} has ended")
        with self._lock:
            if record["op"] != "call":
                with open(self.folder / RECORDS, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            self._writer.put(record)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._put({"op": "params", "params": {k: "null" if v is None else str(v) for k, v in params.items()}})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._put({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which metric ``key`` was logged to this run, by this process or an earlier one of
        the same run (sent to the store, or still in the spool after a SIGKILL)."""
        steps: set[int] = set()
        records = self.folder / RECORDS
        if records.is_file():
            for line in records.read_text().splitlines():
                record = json.loads(line)
                if record["op"] == "metrics" and key in record["metrics"]:
                    steps.add(int(record["step"]))
        if reachable(self.uri):
            from mlflow import MlflowClient

            steps |= {m.step for m in MlflowClient(self.uri).get_metric_history(self.run_id, key)}
        return steps

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self._put({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": int(step),
                   "timestamp": _now_ms()})

    def _stage(self, name: str) -> tuple[Path, str]:
        with self._lock:
            self._files += 1
            rel = f"files/{self._files}/{name}"
        (self.folder / rel).parent.mkdir(parents=True)
        return self.folder / rel, rel

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file as it is now (a copy is kept until it is sent)."""
        dest, rel = self._stage(Path(path).name)
        shutil.copy2(path, dest)
        self._put({"op": "artifact", "file": rel, "artifact_path": artifact_path})

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """``obj`` as JSON (``.json``) or YAML (``.yaml``/``.yml``) at ``artifact_file``."""
        parent, _, name = artifact_file.rpartition("/")
        dest, rel = self._stage(name)
        if name.endswith((".yaml", ".yml")):
            import yaml

            dest.write_text(yaml.safe_dump(obj, sort_keys=False))
        else:
            dest.write_text(json.dumps(obj, indent=2))
        self._put({"op": "artifact", "file": rel, "artifact_path": parent or None})

    def call_in_run(self, fn: Callable[[], None], what: str) -> None:
        """Run ``fn`` in order with the records, with this run active in MLflow's fluent API
        (``mlflow.<flavor>.log_model`` needs that). Not spooled: a silent store skips it."""
        def call() -> None:
            import mlflow
            from mlflow.tracking._tracking_service.utils import _use_tracking_uri

            # MLflow exports the URI it is given to os.environ, where it would pass for the
            # user's MLFLOW_TRACKING_URI (see store.tracking_uri): put the variable back as it was.
            exported = os.environ.get("MLFLOW_TRACKING_URI")
            try:
                with _use_tracking_uri(self.uri), mlflow.start_run(run_id=self.run_id):
                    fn()  # start_run's block ends the run FINISHED; the final status record follows
            finally:
                if exported is None:
                    os.environ.pop("MLFLOW_TRACKING_URI", None)
                else:
                    os.environ["MLFLOW_TRACKING_URI"] = exported

        self._put({"op": "call", "fn": call, "what": what})

    def log_model(self, model: Any, example: Any, spec: dict[str, Any] | None = None) -> None:
        """The trained model as an MLflow model, its spec in the model's metadata
        (:func:`transferlab.tracking.models.log_model`)."""
        def fn() -> None:
            import mlflow

            from transferlab.tracking.models import log_model

            mlflow.set_tag("model_format", log_model(model, example, spec))

        self.call_in_run(fn, "the logged model")

    def end(self, status: str) -> None:
        """Record the final status, send what the store takes, spool the rest."""
        if self._ended:
            return
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self._put({"op": "status", "status": status, "end_time": _now_ms()})
        self._ended = True
        rest = self._writer.drain()
        if not rest:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        skipped = [r["what"] for r in rest if r["op"] == "call"]
        kept = len(rest) - len(skipped)
        print(f"tracking: the store at {self.uri} does not answer; {kept} record(s) of run {self.run_id} "
              f"(final status {status}) are kept in {self.folder}. Send them when it is back with:\n"
              f"    python -m transferlab.tracking replay {self.folder}", file=sys.stderr)
        if skipped:
            print(f"tracking: not recorded (needs the store live): {', '.join(skipped)}", file=sys.stderr)


def replay(folder: str | Path) -> int:
    """Send every record of a spool folder, final status included; remove it when done.
    Returns the number of records sent."""
    from mlflow import MlflowClient

    from transferlab.tracking.preflight import TrackingError

    folder = Path(folder)
    header = folder / HEADER
    if not header.is_file():
        raise TrackingError(f"{folder} is not a spool folder of a run (no {HEADER})")
    info = json.loads(header.read_text())
    uri, run_id = info["tracking_uri"], info["run_id"]
    if not reachable(uri):
        raise TrackingError(f"the store at {uri} does not answer; start it, then replay {folder} again")
    client = MlflowClient(uri)
    lines = (folder / RECORDS).read_text().splitlines() if (folder / RECORDS).is_file() else []
    for line in lines:
        apply(client, run_id, json.loads(line), folder)
    shutil.rmtree(folder)
    status = client.get_run(run_id).info.status
    print(f"tracking: replayed {len(lines)} record(s) into run {run_id} at {uri}; its status is {status}")
    return len(lines)
