"""Run tracking: the only package that talks to MLflow.

- :mod:`~transferlab.tracking.store`: which store (``tracking_uri``) and making it usable (``ensure_store``);
- :mod:`~transferlab.tracking.tracker`: ``Tracker``, one run's records, sent in the background and spooled
  while the store is silent; ``python -m transferlab.tracking replay`` sends what was left;
- :mod:`~transferlab.tracking.run`: ``open_run`` (the run's lifecycle), lineage tags, flattened params;
- :mod:`~transferlab.tracking.handoff`: which run trained the model in ``paths.model``;
- :mod:`~transferlab.tracking.models`: weights from earlier runs, the logged model;
- :mod:`~transferlab.tracking.sweep`: a Hydra sweep's parent run;
- :mod:`~transferlab.tracking.preflight`: the checks before any work;
- :mod:`~transferlab.tracking.summary`, :mod:`~transferlab.tracking.graph`: the model's table and picture.
"""
