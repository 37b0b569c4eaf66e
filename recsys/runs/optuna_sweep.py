"""Optuna searches through Hydra: the search space, the settings and the ask/tell loop of the
`optuna` sweeper (configs/hydra/sweeper/optuna.yaml; Hydra finds the sweeper class in
hydra_plugins/recsys_optuna_sweeper/, which hands the work to this module).

    python train.py +hparams_search=sasrec_optuna data=amazon_beauty hydra.sweeper.n_trials=50

The sweeper asks Optuna (`study.ask`) for `n_jobs` trials at a time, launches them through Hydra's
launcher as one batch (each trial an ordinary run of train.py in `<sweep dir>/<job number>/`, so
hydra/launcher=local|slurm works as for a grid) and tells Optuna what each run returned
(`study.tell`): train.py returns its val/ndcg@10.

The search space is `hydra.sweeper.params` plus the sweep arguments of the command line, in Hydra's
sweep syntax: `interval(a, b)` a float (`tag(log, interval(a, b))` on a log scale), `range(a, b[,
step])` the numbers Hydra's range gives (ints when a, b and step are), `choice(x, y, ...)` or `x,y`
a categorical, `glob(...)` the matching options of a config group. A value in `params` may instead
be Optuna's own terms, `{type: float|int, low: .., high: .., log: false, step: null}` or
`{type: categorical, choices: [..]}`. A key given a plain value on the command line is fixed for
every trial (the command line wins over `params`); every other argument is passed on as it is.

Failures: a trial whose run raised (or returned no number) is told FAIL; when more than
`max_failure_rate` of a batch failed, the sweep stops after that batch with the first failure's
error. Bad settings stop it before anything runs, with one line naming the config key.
`optimization_results.yaml` in the sweep directory (best parameters and value, the best run's
directory) is rewritten after every batch. With `storage` (a database URL, or a file path for
Optuna's journal file) the study outlives the process: the next sweep with the same storage and
study name continues it.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn
from hydra.errors import CompactHydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import Trial, TrialState

from recsys.errors import UserInputError
from recsys.runs.files import write_text_atomic
from recsys.runs.optuna_space import KEY, SearchSpace, one_line, search_space

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"
DIRECTIONS = ("maximize", "minimize")


class SweepFailed(CompactHydraException):
    """The search stopped on trials that returned no number, or none completed (Hydra prints the
    message alone and exits with status 1)."""


# --- the settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    direction: str
    storage: str | None
    study_name: str | None
    n_trials: int
    n_jobs: int
    max_failure_rate: float


def check_settings(
    *,
    direction: Any,
    storage: Any,
    study_name: Any,
    n_trials: Any,
    n_jobs: Any,
    max_failure_rate: Any,
) -> Settings:
    if not isinstance(direction, str) or direction.lower() not in DIRECTIONS:
        raise UserInputError(
            f"{KEY}.direction: {direction!r} is not maximize or minimize "
            "(one objective: train.py returns val/ndcg@10)"
        )
    for name, value in (("n_trials", n_trials), ("n_jobs", n_jobs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"{KEY}.{name}: {value!r} is not a whole number >= 1")
    if (
        isinstance(max_failure_rate, bool)
        or not isinstance(max_failure_rate, int | float)
        or not 0 <= max_failure_rate <= 1
    ):
        raise UserInputError(f"{KEY}.max_failure_rate: {max_failure_rate!r} is not a number from 0 to 1")
    for name, value in (("storage", storage), ("study_name", study_name)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise UserInputError(f"{KEY}.{name}: {value!r} is not null or a non-empty string")
    return Settings(direction.lower(), storage, study_name, n_trials, n_jobs, float(max_failure_rate))


def make_sampler(config: Any, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler of `hydra.sweeper.sampler` ({_target_: an Optuna sampler class, its arguments});
    Optuna's TPE with its defaults when null. `seed_offset` is added to its seed, if it has one."""
    if config is None:
        return optuna.samplers.TPESampler()
    if not isinstance(config, Mapping) or "_target_" not in config:
        raise UserInputError(
            f"{KEY}.sampler: {config!r} names no _target_ (an Optuna sampler class; "
            "hydra/sweeper/sampler=tpe or random)"
        )
    if seed_offset and isinstance(config.get("seed"), int) and not isinstance(config.get("seed"), bool):
        config = {**config, "seed": config["seed"] + seed_offset}
    try:
        sampler = instantiate(config)
    except Exception as err:  # Hydra's InstantiationException: a wrong class or argument
        cause = err.__cause__ or err
        message = f"{type(cause).__name__}: {one_line(cause)}" if err.__cause__ else one_line(err)
        raise UserInputError(f"{KEY}.sampler: {config['_target_']}: {message}") from None
    if not isinstance(sampler, optuna.samplers.BaseSampler):
        raise UserInputError(f"{KEY}.sampler: {config['_target_']} is not an Optuna sampler")
    return sampler


def open_storage(storage: str | None) -> optuna.storages.BaseStorage | None:
    """None (in memory), a database URL (`sqlite:///study.db`, `postgresql://...`) or, for any
    other string, the path of a journal file (Optuna's JournalFileBackend; no database needed)."""
    if storage is None:
        return None
    try:
        if "://" in storage:
            return RDBStorage(storage)
        path = Path(storage).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    except Exception as err:  # whatever SQLAlchemy or the file system says about it
        raise UserInputError(f"{KEY}.storage: cannot open {storage!r}: {one_line(err)}") from None


def open_study(settings: Settings, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """A new study, or the one of that name in the storage (whose direction must be the same)."""
    storage = open_storage(settings.storage)
    study = optuna.create_study(
        storage=storage,
        sampler=sampler,
        study_name=settings.study_name,
        direction=settings.direction,
        load_if_exists=True,
    )
    directions = [d.name.lower() for d in study.directions]
    if directions != [settings.direction]:
        raise UserInputError(
            f"{KEY}.direction: study {study.study_name!r} in {settings.storage} is to "
            f"{' and '.join(directions)}, not {settings.direction}"
        )
    return study


# --- the search ----------------------------------------------------------------------------------


Launch = Callable[[Sequence[Sequence[str]], int], Sequence[JobReturn]]


@dataclass
class Search:
    """A prepared search: what `OptunaSweeper.sweep` runs once the settings have been checked."""

    settings: Settings
    space: SearchSpace
    study: optuna.Study
    sweep_dir: Path

    def run(self, launch: Launch) -> optuna.Study:
        settings, study = self.settings, self.study
        log.info(
            f"Optuna study {study.study_name!r} ({settings.storage or 'in memory'}, "
            f"{len(study.trials)} trials before), {type(study.sampler).__name__}, {settings.direction}; "
            f"{settings.n_trials} trials, {settings.n_jobs} at a time"
        )
        job_idx = 0
        while job_idx < settings.n_trials:
            size = min(settings.n_jobs, settings.n_trials - job_idx)
            trials = [study.ask(self.space.distributions) for _ in range(size)]
            batch = [self.space.overrides(trial.params) for trial in trials]
            try:
                returns = launch(batch, job_idx)
            except BaseException:
                # Bad input in a run (it exits), Ctrl-C, a launcher error: no trial stays RUNNING.
                for trial in trials:
                    _fail(study, trial)
                raise
            job_idx += size
            failures = [
                self._tell(trial, overrides, ret) for trial, overrides, ret in zip(trials, batch, returns)
            ]
            failures = [f for f in failures if f is not None]
            write_results(study, self.sweep_dir, settings.storage)
            if failures and len(failures) / size > settings.max_failure_rate:
                log.error(
                    f"{len(failures)} of {size} trials of the batch failed "
                    f"({KEY}.max_failure_rate={settings.max_failure_rate}): stopping the search"
                )
                raise failures[0]
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            raise SweepFailed(f"no trial of Optuna study {study.study_name!r} completed")
        best = study.best_trial
        log.info(
            f"best trial {best.number} ({best.user_attrs.get('run_dir')}): {best.value} with {best.params}"
        )
        return study

    def _tell(self, trial: Trial, overrides: Sequence[str], ret: JobReturn) -> BaseException | None:
        """Tell Optuna what the run returned; the failure, if it failed."""
        run_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
        run_dir = str(run_dir or ret.working_dir or "")
        trial.set_user_attr("run_dir", run_dir)
        trial.set_user_attr("overrides", list(overrides))
        try:
            value = ret.return_value  # the run's exception, raised again, if it failed
        except Exception as err:
            _fail(self.study, trial)
            log.warning(f"trial {trial.number} failed: {type(err).__name__}: {one_line(err)}")
            return err
        number = _number(value)
        if number is None:
            _fail(self.study, trial)
            message = f"trial {trial.number} ({run_dir}) returned {value!r}, not a number to {self.settings.direction}"
            log.warning(message)
            return SweepFailed(message)
        self.study.tell(trial, number)
        log.info(f"trial {trial.number} ({run_dir}): {number}")
        return None


def _fail(study: optuna.Study, trial: Trial) -> None:
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def write_results(study: optuna.Study, sweep_dir: Path, storage: str | None) -> dict | None:
    """optimization_results.yaml: the study's best trial (from earlier sweeps too, with a storage)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    counts = Counter(trial.state.name.lower() for trial in study.get_trials(deepcopy=False))
    results = {
        "name": "optuna",
        "best_params": dict(best.params),
        "best_value": best.value,
        "best_trial": best.number,
        "best_run_dir": best.user_attrs.get("run_dir"),
        "study_name": study.study_name,
        "storage": storage,
        "direction": study.direction.name.lower(),
        "trials": dict(counts),
    }
    write_text_atomic(sweep_dir / RESULTS_FILE, OmegaConf.to_yaml(OmegaConf.create(results)))
    return results


def prepare(
    options: Mapping[str, Any],
    arguments: Sequence[str],
    sweep_dir: str | Path,
    config_loader: Any = None,
    validate: Callable[[Sequence[Sequence[str]]], None] | None = None,
) -> Search:
    """Check the settings and the search space (UserInputError naming the key), open the study.

    `options`: direction, storage, study_name, n_trials, n_jobs, max_failure_rate, sampler, params
    (the keys of hydra.sweeper). `validate` composes a batch of overrides (Hydra's
    `Sweeper.validate_batch_is_legal`): a searched key missing from the config fails here.
    """
    settings = check_settings(**{k: options.get(k) for k in Settings.__dataclass_fields__})
    space = search_space(options.get("params"), arguments, config_loader)
    if validate is not None:
        validate([space.probe()])
    sampler = make_sampler(options.get("sampler"))
    study = open_study(settings, sampler)
    if study.trials:
        # A continued study: a seeded sampler would replay the first sweep's random trials; it
        # is seeded with seed + the number of trials so far instead (still reproducible).
        study.sampler = make_sampler(options.get("sampler"), seed_offset=len(study.trials))
    return Search(settings, space, study, Path(str(sweep_dir)))
