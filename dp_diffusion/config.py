"""How every config value is checked: one `ConfigError` line naming the dotted key, the value and what is allowed.

    privacy.epsilon must be a finite number > 0, got -1

The pieces, used the same way by every module that reads a config block:

- `require(ok, key, value, allowed)`: the one place the message is written.
- `Rule`: a check and the words for what it allows (`integer(1)`, `number(0)`, `one_of(...)`, `BOOL`,
  `optional(...)`); `check_rules(block, rules, prefix)` applies a table of them to a block.
- `Settings`: the base of a frozen dataclass read from one config block. `from_config` rejects unknown
  keys, fills the defaults and validates each field against the class's `RULES`; a subclass adds checks
  that span fields in `validate` with `self.require`.

This module imports nothing from `dp_diffusion`, so the data, privacy and method modules can all use it
without an import cycle. The checks of a whole composed run config (which need the registries of those
modules) are in :mod:`dp_diffusion.run_config`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config value the user has to change."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise `ConfigError("<key> must be <allowed>, got <value!r>")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML's true is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """What one config value may be: a predicate and the words for it ("an integer >= 1")."""

    ok: Callable[[Any], bool]
    allowed: str

    def check(self, key: str, value: Any) -> None:
        require(self.ok(value), key, value, self.allowed)


BOOL = Rule(lambda v: isinstance(v, bool), "true or false")


def integer(low: int | None = None, high: int | None = None) -> Rule:
    """An integer in [low, high] (either end open when None)."""
    if low is not None and high is not None:
        allowed = f"an integer in [{low}, {high}]"
    elif low is not None:
        allowed = f"an integer >= {low}"
    elif high is not None:
        allowed = f"an integer <= {high}"
    else:
        allowed = "an integer"
    return Rule(lambda v: is_int(v) and (low is None or v >= low) and (high is None or v <= high),
                allowed)


def number(above: float | None = None, below: float | None = None, finite: bool = False,
           at_least: float | None = None) -> Rule:
    """A number > `above` (or >= `at_least`) and < `below`; `finite` excludes inf (and says so)."""
    words = "a finite number" if finite else "a number"
    if at_least is not None and below is not None:
        allowed = f"in [{at_least:g}, {below:g})"
    elif above is not None and below is not None:
        allowed = f"in ({above:g}, {below:g})"
    elif above is not None:
        allowed = f"{words} > {above:g}"
    elif at_least is not None:
        allowed = f"{words} >= {at_least:g}"
    else:
        allowed = words

    def ok(v: Any) -> bool:
        return (is_number(v) and not math.isnan(v) and (not finite or math.isfinite(v))
                and (above is None or v > above) and (at_least is None or v >= at_least)
                and (below is None or v < below))

    return Rule(ok, allowed)


def one_of(choices: Iterable[Any]) -> Rule:
    """One of `choices`; the message shows them as given (a tuple, or a sorted list)."""
    shown = choices if isinstance(choices, (tuple, list)) else sorted(choices)
    return Rule(lambda v: v in shown, f"one of {shown}")


def optional(rule: Rule, null: str = "null") -> Rule:
    """None, or what `rule` allows; `null` says what None means ("null (all)")."""
    return Rule(lambda v: v is None or rule.ok(v), f"{null} or {rule.allowed}")


def check_rules(block: Mapping[str, Any] | DictConfig, rules: Mapping[str, Rule], prefix: str,
                defaults: Mapping[str, Any] | None = None) -> None:
    """Check `block[key]` against each rule, naming it `<prefix>.<key>`; a key missing from the block takes
    its value from `defaults` (missing there too: None)."""
    defaults = defaults or {}
    for key, rule in rules.items():
        rule.check(f"{prefix}.{key}", block.get(key, defaults.get(key)))


def check_keys(values: Iterable[str], known: Iterable[str], prefix: str) -> None:
    """ConfigError naming the first unknown keys of block `prefix` and the known ones."""
    known = sorted(known)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{prefix} has unknown keys {unknown}; known: {known}")


def to_plain(cfg: Any) -> Any:
    """A (resolved) plain dict or list of a DictConfig / ListConfig; other values as they are."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return {key: to_plain(value) for key, value in cfg.items()}
    return cfg


S = TypeVar("S", bound="Settings")


class Settings:
    """Base of a frozen dataclass read from one config block (subclasses are `@dataclass(frozen=True)`).

    `KEY` is the block's dotted key ("method.module.synthetic"); `RULES` maps field names to their `Rule`.
    """

    KEY: ClassVar[str] = ""
    RULES: ClassVar[Mapping[str, Rule]] = {}

    @classmethod
    def from_config(cls: type[S], cfg: Mapping[str, Any] | DictConfig | None) -> S:
        """The settings of block `cfg` (None: all defaults); ConfigError for an unknown key or a bad value."""
        values = {} if cfg is None else to_plain(cfg)
        check_keys(values, [f.name for f in dataclasses.fields(cls)], cls.KEY)  # type: ignore[arg-type]
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check every field that has a rule; subclasses extend it with checks that span fields."""
        for name, rule in self.RULES.items():
            rule.check(self.key(name), getattr(self, name))

    def key(self, name: str) -> str:
        """The dotted key of field `name`."""
        return f"{self.KEY}.{name}" if self.KEY else name

    def require(self, ok: bool, name: str, allowed: str) -> None:
        """`require` for field `name` of this block."""
        require(ok, self.key(name), getattr(self, name), allowed)
