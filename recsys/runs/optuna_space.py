"""The search space of an Optuna search (recsys/runs/optuna_sweep.py): `hydra.sweeper.params` and the
command line's sweep arguments, in Hydra's sweep syntax or Optuna's own terms, as Optuna
distributions; each bad entry is a one-line UserInputError naming its key."""

from __future__ import annotations

import decimal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from recsys.errors import UserInputError

# Optuna's terms for a searched key in hydra.sweeper.params: {type: .., and these keys}.
SPACE_TYPES = {
    "float": ("low", "high", "log", "step"),
    "int": ("low", "high", "log", "step"),
    "categorical": ("choices",),
}
KEY = "hydra.sweeper"


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def override_text(value: Any) -> str:
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
        return f"{self.key}={override_text(value)}"

    def first(self) -> str:
        """An override with a value of the space (its low end or first choice), to check it composes."""
        if self.texts is not None:
            return f"{self.key}={self.texts[0]}"
        return f"{self.key}={override_text(self.distribution.low)}"


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
    choices = [
        v if v is None or isinstance(v, bool | int | float | str) else override_text(v) for v in values
    ]
    return Searched(key, CategoricalDistribution(choices), tuple(override_text(v) for v in values))


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
            raise UserInputError(f"{where}: {one_line(err)}") from None
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
            raise UserInputError(f"{where}: {one_line(err)}") from None
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
        raise UserInputError(f"{where}: {one_line(err)}") from None
    return Searched(key, distribution)


def _parse(parser: OverridesParser, line: str, where: str) -> Override:
    try:
        return parser.parse_overrides([line])[0]
    except HydraException as err:
        raise UserInputError(f"{where}: {one_line(err).split(' See https://')[0]}") from None


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
        value = spec if isinstance(spec, str) else override_text(spec)
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
