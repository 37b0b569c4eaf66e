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

import decimal
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.utils import JobReturn
from hydra.errors import CompactHydraException, HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import Trial, TrialState

from recsys.errors import UserInputError
from recsys.runs.files import write_text_atomic

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"
DIRECTIONS = ("maximize", "minimize")
# Optuna's terms for a searched key in hydra.sweeper.params: {type: .., and these keys}.
SPACE_TYPES = {
    "float": ("low", "high", "log", "step"),
    "int": ("low", "high", "log", "step"),
    "categorical": ("choices",),
}
KEY = "hydra.sweeper"


class SweepFailed(CompactHydraException):
    """The search stopped on trials that returned no number, or none completed (Hydra prints the
    message alone and exits with status 1)."""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _text(value: Any) -> str:
    """A value as the right-hand side of a Hydra override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return Transformer.str(value)


# --- the search space ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Searched:
    """One searched key: its Optuna distribution and, for a categorical, each choice as override text."""

    key: str  # the override's key, as given (`model.dropout`, `+model.extra`, `model@pkg`)
    distribution: BaseDistribution
    texts: tuple[str, ...] | None = None

    def override(self, value: Any) -> str:
        if self.texts is not None:
            return f"{self.key}={self.texts[int(self.distribution.to_internal_repr(value))]}"
        return f"{self.key}={_text(value)}"

    def first(self) -> str:
        """An override with a value of the space (its low end or first choice), to check it composes."""
        if self.texts is not None:
            return f"{self.key}={self.texts[0]}"
        return f"{self.key}={_text(self.distribution.low)}"


@dataclass(frozen=True)
class SearchSpace:
    """The searched keys and the fixed overrides, in command-line order."""

    entries: tuple[Searched | str, ...]

    @property
    def distributions(self) -> dict[str, BaseDistribution]:
        return {e.key: e.distribution for e in self.entries if isinstance(e, Searched)}

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        return [e if isinstance(e, str) else e.override(params[e.key]) for e in self.entries]

    def probe(self) -> list[str]:
        return [e if isinstance(e, str) else e.first() for e in self.entries]


def _categorical(key: str, values: Sequence[Any], where: str) -> Searched:
    if not values:
        raise UserInputError(f"{where}: no choices")
    # Optuna keeps None, bool, int, float and str; a list or dict choice is kept as its override text.
    choices = [v if v is None or isinstance(v, bool | int | float | str) else _text(v) for v in values]
    return Searched(key, CategoricalDistribution(choices), tuple(_text(v) for v in values))


def _float_range(start: float, count: int, step: float) -> tuple[float, float, float]:
    """low, high, step of Hydra's float range, in decimal: range(0.5, 0.1, -0.1) is 0.2 .. 0.5."""
    first, step_ = decimal.Decimal(str(start)), decimal.Decimal(str(step))
    last = first + (count - 1) * step_
    return float(min(first, last)), float(max(first, last)), float(abs(step_))


def _from_override(override: Override, where: str) -> Searched | str:
    """The searched key of a sweep override, or the override's text when it is a plain value."""
    if not override.is_sweep_override():
        assert override.input_line is not None
        return override.input_line
    key = override.get_key_element()
    if override.is_delete():
        raise UserInputError(f"{where}: a deletion (~) cannot be searched")
    value = override.value()
    tags = set(getattr(value, "tags", ()) or ())
    if override.is_interval_sweep():
        if tags - {"log"}:
            raise UserInputError(f"{where}: unknown tag {sorted(tags - {'log'})} (interval takes `log` only)")
        try:
            return Searched(key, FloatDistribution(float(value.start), float(value.end), log="log" in tags))
        except ValueError as err:
            raise UserInputError(f"{where}: {_one_line(err)}") from None
    if tags:
        raise UserInputError(f"{where}: tags {sorted(tags)} apply to interval() only")
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise UserInputError(f"{where}: the range is empty")
        step = value.step
        if all(isinstance(v, int) for v in values) and isinstance(step, int):
            return Searched(key, IntDistribution(min(values), max(values), step=abs(step)))
        low, high, step = _float_range(values[0], len(values), step)
        return Searched(key, FloatDistribution(low, high, step=step))
    if override.is_choice_sweep():
        try:
            values = list(override.sweep_iterator())
        except HydraException as err:  # glob() without a config loader to list the group
            raise UserInputError(f"{where}: {_one_line(err)}") from None
        return _categorical(key, values, where)
    raise UserInputError(f"{where}: not a search space (interval, range, choice or glob)")


def _from_mapping(key: str, spec: Mapping[str, Any], where: str) -> Searched:
    """A searched key in Optuna's terms: {type: float|int, low, high, log, step} or {type: categorical, choices}."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if not isinstance(kind, str) or kind not in SPACE_TYPES:
        raise UserInputError(f"{where}.type: {kind!r} is not one of {', '.join(SPACE_TYPES)}")
    unknown = sorted(set(spec) - set(SPACE_TYPES[kind]))
    if unknown:
        raise UserInputError(
            f"{where}: unknown key(s) {unknown} for type {kind} (expected {', '.join(SPACE_TYPES[kind])})"
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list):
            raise UserInputError(f"{where}.choices: a list of values is needed, not {choices!r}")
        return _categorical(key, choices, f"{where}.choices")
    number = int if kind == "int" else (int, float)
    for name in ("low", "high"):
        if isinstance(spec.get(name), bool) or not isinstance(spec.get(name), number):
            raise UserInputError(
                f"{where}.{name}: {spec.get(name)!r} is not {'an int' if kind == 'int' else 'a number'}"
            )
    log_scale = spec.get("log", False)
    if not isinstance(log_scale, bool):
        raise UserInputError(f"{where}.log: {log_scale!r} is not true or false")
    step = spec.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, number)):
        raise UserInputError(f"{where}.step: {step!r} is not {'an int' if kind == 'int' else 'a number'}")
    try:
        if kind == "int":
            distribution = IntDistribution(spec["low"], spec["high"], log=log_scale, step=step or 1)
        else:
            distribution = FloatDistribution(spec["low"], spec["high"], log=log_scale, step=step)
    except ValueError as err:
        raise UserInputError(f"{where}: {_one_line(err)}") from None
    return Searched(key, distribution)


def _parse(parser: OverridesParser, line: str, where: str) -> Override:
    try:
        return parser.parse_overrides([line])[0]
    except HydraException as err:
        raise UserInputError(f"{where}: {_one_line(err).split(' See https://')[0]}") from None


def search_space(
    params: Mapping[str, Any] | None, arguments: Sequence[str] = (), config_loader: Any = None
) -> SearchSpace:
    """The search space of `hydra.sweeper.params` and the command line's sweep `arguments`.

    A key of the command line replaces the same key of `params` (a plain value fixes it).
    """
    parser = OverridesParser.create(config_loader=config_loader)
    entries: dict[tuple[str, str | None], Searched | str] = {}

    def put(override: Override, entry: Searched | str) -> None:
        slot = (override.key_or_group, override.package)
        entries.pop(slot, None)  # the later one wins, in its own place
        entries[slot] = entry

    if params is not None and not isinstance(params, Mapping):
        raise UserInputError(f"{KEY}.params: a mapping of config keys to search spaces, not {params!r}")
    for name, spec in (params or {}).items():
        where = f"{KEY}.params['{name}']"
        if isinstance(spec, Mapping):
            override = _parse(parser, f"{name}=0", where)  # the key alone
            if override.is_delete():
                raise UserInputError(f"{where}: a deletion (~) cannot be searched")
            spec = OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else spec
            put(override, _from_mapping(override.get_key_element(), spec, where))
            continue
        if isinstance(spec, ListConfig):
            spec = OmegaConf.to_container(spec)
        value = spec if isinstance(spec, str) else _text(spec)
        override = _parse(parser, f"{name}={value}", where)
        put(override, _from_override(override, where))
    for argument in arguments:
        where = f"command line `{argument}`"
        override = _parse(parser, argument, where)
        put(override, _from_override(override, where))
    space = SearchSpace(tuple(entries.values()))
    if not space.distributions:
        raise UserInputError(f"{KEY}.params: nothing to search (no interval, range, choice or glob)")
    return space


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
        message = f"{type(cause).__name__}: {_one_line(cause)}" if err.__cause__ else _one_line(err)
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
        raise UserInputError(f"{KEY}.storage: cannot open {storage!r}: {_one_line(err)}") from None


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
            log.warning(f"trial {trial.number} failed: {type(err).__name__}: {_one_line(err)}")
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
