"""What a config key may hold, and the one-line errors that say so.

Every seam of the library (data, model, method, optimization, augmentation, evaluation, runtime;
see `simco_jax.config`) declares its keys as {key: Domain} and its constraints between keys as
messages; `check` runs them. A domain is what the computation can take: numbers are checked
against float32 (what they become on the device), not only against float64.

No JAX here: configs are checked before anything heavy is imported, loaded or compiled.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import ml_collections

# float32's largest finite value and its smallest normal one: a key that ends up as a float32
# on the device must be finite there, and a divisor's reciprocal too (1 / FLOAT32_TINY is finite).
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38


class ConfigError(ValueError):
    """A configuration that cannot run; the message says how to fix it."""


class Domain(NamedTuple):
    accepts: Callable[[Any], bool]
    text: str  # completes "<key> must be ..."


class Seam(NamedTuple):
    """One part of the library's config: its keys' domains, and its constraints between keys
    (`checks(config, num_devices)` yields one message per violated constraint)."""

    domains: dict[str, Domain]
    checks: Callable[[Any, int | None], Iterator[str]] = lambda config, num_devices: iter(())


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    """A number that is finite as a float32 (1e39 is finite in float64 but inf on the device)."""
    return (
        isinstance(v, numbers.Real)
        and not isinstance(v, bool)
        and math.isfinite(v)
        and abs(v) <= FLOAT32_MAX
    )


def integer(lo: int | None = None, hi: int | None = None, *, note: str = "") -> Domain:
    """An int (not a bool) in [lo, hi]; None leaves that side open. `note` is appended."""
    ok = lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
    if hi is not None:
        text = f"an integer in [{lo}, {hi}]"
    else:
        text = f"an integer >= {lo}" if lo is not None else "an integer"
    return Domain(ok, f"{text} ({note})" if note else text)


def real(lo: float, hi: float = FLOAT32_MAX, *, open_lo: bool = False, open_hi: bool = False):
    """A float32-finite number between lo and hi; `open_*` excludes the bound."""

    def ok(v):
        return _is_real(v) and (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)

    if hi == FLOAT32_MAX:
        text = f"a finite float32 {'>' if open_lo else '>='} {lo:g}"
    else:
        text = f"a finite number in {'(['[not open_lo]}{lo:g}, {hi:g}{')]'[not open_hi]}"
    return Domain(ok, text)


def one_of(*choices) -> Domain:
    return Domain(lambda v: isinstance(v, str) and v in choices, f"one of {choices}")


def rgb(channel: Domain) -> Domain:
    """Three per-channel values (R, G, B)."""
    ok = lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and all(map(channel.accepts, v))
    return Domain(ok, f"three values (R, G, B), each {channel.text}")


BOOL = Domain(lambda v: isinstance(v, bool), "True or False")
TEXT = Domain(lambda v: isinstance(v, str), "a string")
NAME = Domain(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
PROBABILITY = real(0.0, 1.0)
POSITIVE = real(0.0, open_lo=True)
# A number the computation divides by: its reciprocal must be a finite float32 too.
DIVISOR = Domain(
    lambda v: _is_real(v) and v >= FLOAT32_TINY,
    f"a finite float32 >= {FLOAT32_TINY:.3g} (its reciprocal must be a finite float32)",
)
COUNT = integer(1)
# A period in epochs (a float: 0.5 is half an epoch), or None where the `_steps` spelling is used.
EPOCHS_OR_NONE = Domain(lambda v: v is None or POSITIVE.accepts(v), "None or a finite number > 0")
STEPS_OR_NONE = Domain(
    lambda v: v is None or COUNT.accepts(v), "None or an integer >= 1 (or use the _epochs key)"
)


def unknown_keys_message(
    unknown: Iterable[str], known: Iterable[str], *, flag: str = "", noun: str = "config key"
) -> str:
    """One line naming the unknown keys, with the closest known key of each (the whole list of
    keys would be a screenful: base_config() in simco_jax/config.py has them with comments).

    Dotted keys ('evals.probe.typo') are matched among the keys of their own group."""
    known = list(known)
    parts = []
    for key in unknown:
        group, _, leaf = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == group]
        close = difflib.get_close_matches(leaf, siblings, n=1)
        if close:
            hint = f" (did you mean {flag}{group + '.' if group else ''}{close[0]}?)"
        else:  # a group's few keys, not the top level's screenful
            hint = f" ({flag}{group} holds {', '.join(siblings)})" if group and siblings else ""
        parts.append(f"{flag}{key}{hint}")
    return f"unknown {noun}{'s' if len(parts) > 1 else ''} " + ", ".join(parts)


def as_text(value) -> str:
    """A value as one line (a ConfigDict as its dict, not its YAML)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return repr(value)


def check(config, seams: Iterable[Seam], *, num_devices: int | None = None, what: str = "") -> None:
    """Every key of `config` against the seams' domains, then their constraints; the first
    violation raises a one-line ConfigError. `what` names the schema in the unknown-key message
    (e.g. 'linear_eval')."""
    seams = list(seams)
    domains: dict[str, Domain] = {k: d for seam in seams for k, d in seam.domains.items()}
    unknown = [key for key in config.keys() if key not in domains]
    if unknown:
        noun = f"{what} key" if what else "config key"
        message = unknown_keys_message(unknown, domains, noun=noun)
        raise ConfigError(f"{message}; the keys: {keys_location(what)}")
    for key, domain in domains.items():
        if key in config and not domain.accepts(config[key]):
            raise ConfigError(f"{key} must be {domain.text}, got {as_text(config[key])}")
    for seam in seams:
        for message in seam.checks(config, num_devices):
            raise ConfigError(message)


def keys_location(what: str = "") -> str:
    """Where the keys of a schema are listed, with what each means."""
    if what == "linear_eval":
        return "default_config() in simco_jax/linear_eval.py"
    return "base_config() in simco_jax/config.py"


def flatten(config: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': leaf} of a nested config."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
