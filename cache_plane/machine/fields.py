"""Field validation of replicated commands, and the two ways a command is refused. PURE.

A handler validates every field before it changes anything; `Invalid` (a malformed field)
and `Rejected` (it names something that does not exist) are raised only then, and `apply`
turns them into error results: no handler raises past `apply`.
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..calibration import DEFAULT_SPEEDS, Speeds
from ..limits import MAX_COUNT, MAX_ID_BYTES, MAX_PROMPT_BLOCKS, MAX_SLOTS
from ..policy import PolicyConfig

MASK64 = (1 << 64) - 1


class Invalid(Exception):
    """Internal: a field failed validation (never escapes `apply`)."""


class Rejected(Exception):
    """Internal: the command refers to something that does not exist (never escapes `apply`).

    Like `Invalid`, raised only before a handler changes anything.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code



def str_field(cmd: Mapping[str, Any], name: str, *, optional: bool = False) -> str | None:
    value = cmd.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value.encode()) > MAX_ID_BYTES:
        raise Invalid(f"field '{name}' must be a non-empty string of at most {MAX_ID_BYTES} bytes")
    return value


def int_field(cmd: Mapping[str, Any], name: str, lo: int, hi: int, default: int | None = None) -> int:
    value = cmd.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise Invalid(f"field '{name}' must be an integer in [{lo}, {hi}]")
    return value


def policy_field(cmd: Mapping[str, Any], default: PolicyConfig) -> PolicyConfig:
    """The policy the leader stamped into a route command (its settings), else `default`.

    Operators set `load_weight` and `session_max_load` per member; a replica re-deciding a
    route must use the leader's values, not its own, or replicas with different settings
    would diverge.
    """
    weights = []
    for name, positive in (("load_weight", False), ("session_max_load", True)):
        value = cmd.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not 0 <= value <= 1e6 or (positive and value == 0)):
            raise Invalid(f"field '{name}' must be a number in {'(' if positive else '['}0, 1e6]")
        weights.append(value)
    if weights == [None, None]:
        return default
    return with_weights(default, *weights)


@functools.lru_cache(maxsize=64)
def with_weights(default: PolicyConfig, load_weight: float | None,
                  session_max_load: float | None) -> PolicyConfig:
    return replace(default, load_weight=default.load_weight if load_weight is None
                   else float(load_weight),
                   session_max_load=default.session_max_load if session_max_load is None
                   else float(session_max_load))


PRIOR_FIELDS = (("prefill_tokens_per_s", 1 << 40), ("decode_ms_per_token", 1e6),
                 ("mean_output_tokens", 1 << 24))


def prior_field(cmd: Mapping[str, Any]) -> Speeds:
    """The speeds the leader stamped into the command (its settings), else the defaults.

    They are the load model's priors: a node's learned speeds replace them one by one as
    completion reports arrive (`calibration`). 0 or absent means the default.
    """
    values = []
    for name, hi in PRIOR_FIELDS:
        value = cmd.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not 0 <= value <= hi):
            raise Invalid(f"field '{name}' must be a number in [0, {hi:g}]")
        values.append(value or None)
    return speeds_of(*values)


@functools.lru_cache(maxsize=64)
def speeds_of(rate: float | None, decode: float | None, output: float | None) -> Speeds:
    d = DEFAULT_SPEEDS
    return Speeds(1000 / rate if rate else d.prefill_ms_per_token,
                  float(decode) if decode else d.decode_ms_per_token,
                  float(output) if output else d.output_tokens)


def opt_int(cmd: Mapping[str, Any], name: str, hi: int = MAX_COUNT) -> int | None:
    return None if cmd.get(name) is None else int_field(cmd, name, 0, hi)


def pairs_field(cmd: Mapping[str, Any], name: str) -> list[tuple[int, int]]:
    """A list of [model_code, block_hash] pairs (eviction victims)."""
    value = cmd.get(name, [])
    if not isinstance(value, list) or len(value) > MAX_PROMPT_BLOCKS:
        raise Invalid(f"field '{name}' must be a list of [model, block] pairs")
    out = []
    for pair in value:
        if (not isinstance(pair, list | tuple) or len(pair) != 2
                or not all(type(x) is int for x in pair)
                or not (0 <= pair[0] < MAX_SLOTS and 0 <= pair[1] <= MASK64)):
            raise Invalid(f"field '{name}' must be a list of [model, block] pairs")
        out.append((pair[0], pair[1]))
    return out


def hashes_field(cmd: Mapping[str, Any], name: str, limit: int = MAX_PROMPT_BLOCKS) -> list[int]:
    value = cmd.get(name, [])
    if not isinstance(value, list) or len(value) > limit:
        raise Invalid(f"field '{name}' must be a list of at most {limit} block hashes")
    # One C-level pass (prompts carry hundreds of hashes and every replica checks them):
    # array('Q') refuses anything but integers in [0, 2**64). It takes a bool as 0/1, which is
    # harmless here (deterministic); the HTTP layer refuses bools with a clear message.
    try:
        array("Q", value)
    except (TypeError, OverflowError):
        raise Invalid(f"field '{name}' must hold unsigned 64-bit integers") from None
    return value
