"""Hydra sweeper `optuna`: an Optuna search, trial by trial through Hydra's launcher.

Configured by configs/hydra/sweeper/optuna.yaml (and hydra/sweeper/sampler=tpe|random); the search
itself is recsys/runs/optuna_sweep.py. Hydra imports this module at every start of train.py, so it
imports neither Optuna nor recsys until a search runs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """`hydra.sweeper` of configs/hydra/sweeper/optuna.yaml; each key is described there."""

    def __init__(
        self,
        direction: Any = "maximize",
        storage: Any = None,
        study_name: Any = None,
        n_trials: Any = 20,
        n_jobs: Any = 1,
        max_failure_rate: Any = 0.0,
        sampler: Any = None,
        params: Any = None,
    ) -> None:
        self.options = {
            "direction": direction,
            "storage": storage,
            "study_name": study_name,
            "n_trials": n_trials,
            "n_jobs": n_jobs,
            "max_failure_rate": max_failure_rate,
            "sampler": sampler,
            "params": params,
        }
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> Any:
        from recsys.errors import UserInputError
        from recsys.runs.optuna_sweep import prepare

        assert self.config is not None and self.hydra_context is not None and self.launcher is not None
        try:
            search = prepare(
                self.options,
                arguments,
                sweep_dir=self.config.hydra.sweep.dir,
                config_loader=self.hydra_context.config_loader,
                validate=self.validate_batch_is_legal,
            )
        except UserInputError as err:  # bad settings: one line and exit status 2, as train.py does
            print(f"error: {err}", file=sys.stderr)
            logging.shutdown()
            sys.exit(2)

        def launch(batch: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
            return self.launcher.launch(batch, initial_job_idx=initial_job_idx)

        return search.run(launch)
