"""``hydra/sweeper=job_list``: a multirun of a given list of jobs, rather than a cartesian product.

Hydra's basic sweeper runs every combination of comma lists; an ablation report needs arms that each
change different keys (``backbone.weights=null`` in one, ``head=mlp`` in another), each with every
seed. This sweeper reads the jobs from a JSON file (``hydra.sweeper.jobs_file``: a list of jobs, each
a list of overrides) and runs each as the command line's overrides followed by the job's own. Each job's
overrides are therefore exactly a command that reproduces it; launching, the sweep folder and the
callbacks (one MLflow parent run, resuming finished jobs) are the basic sweeper's.
"""

# No `from __future__ import annotations`: Hydra loads plugin modules outside sys.modules, where
# dataclasses cannot resolve string annotations.
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException


@dataclass
class JobListSweeperConf:
    _target_: str = "hydra_plugins.transferlab_jobs.JobListSweeper"
    jobs_file: Optional[str] = None
    max_batch_size: Optional[int] = None


ConfigStore.instance().store(group="hydra/sweeper", name="job_list", node=JobListSweeperConf,
                             provider="transferlab")


class JobListSweeper(BasicSweeper):
    def __init__(self, jobs_file: Optional[str], max_batch_size: Optional[int] = None) -> None:
        super().__init__(max_batch_size=max_batch_size)
        if not jobs_file:
            raise HydraException("hydra/sweeper=job_list needs hydra.sweeper.jobs_file (a JSON list of jobs)")
        self.jobs: List[List[str]] = json.loads(Path(jobs_file).read_text())

    def split_arguments(self, overrides: List[Override], max_batch_size: Optional[int]) -> Any:  # type: ignore[override]
        common = []
        for override in overrides:
            if override.is_sweep_override():
                raise HydraException(f"hydra/sweeper=job_list: '{override.input_line}' is a sweep; put each "
                                     "value in its own job of the jobs file")
            common.append(f"{override.get_key_element()}={override.get_value_element_as_str()}")
        jobs = [[*common, *job] for job in self.jobs]
        size = max_batch_size or len(jobs) or 1
        return [jobs[i:i + size] for i in range(0, len(jobs), size)]
