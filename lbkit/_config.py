"""Frozen, validated option classes: unknown options raise ConfigError naming them."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import grpc

from lbkit.errors import ConfigError

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # pragma: no cover
    from typing_extensions import dataclass_transform

__all__ = ["check_choice", "check_float", "check_int", "check_status_codes", "config"]

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def config(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen dataclass whose constructor rejects unknown options with ConfigError."""
    dc: Any = dataclasses.dataclass(frozen=True)(cls)
    init: Callable[..., None] = dc.__init__
    names = [n for n in inspect.signature(init).parameters if n != "self"]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}; valid options are {names}")
        if len(args) > len(names):
            raise ConfigError(
                f"{cls.__name__}: takes at most {len(names)} positional options, got {len(args)}"
            )
        init(self, *args, **kwargs)

    dc.__init__ = __init__
    return dc  # type: ignore[no-any-return]


def check_int(owner: str, name: str, value: object, *, minimum: int | None = None) -> int:
    """Return ``value`` if it is an int (not a bool) >= ``minimum``; else raise ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}: {name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{owner}: {name} must be >= {minimum}, got {value!r}")
    return value


def check_float(
    owner: str,
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_min: bool = False,
) -> float:
    """Return ``value`` as a finite float within bounds; else raise ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{owner}: {name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict_min else value < minimum):
        raise ConfigError(f"{owner}: {name} must be {'>' if strict_min else '>='} {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{owner}: {name} must be <= {maximum}, got {value!r}")
    return float(value)


def check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``; else raise ConfigError naming it."""
    if value not in choices:
        raise ConfigError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}")
    return str(value)


def check_status_codes(owner: str, name: str, codes: object) -> frozenset[grpc.StatusCode]:
    """Return ``codes`` as a frozenset of failing ``grpc.StatusCode`` members; else raise ConfigError."""
    if isinstance(codes, (str, bytes, grpc.StatusCode)) or not isinstance(codes, Iterable):
        raise ConfigError(f"{owner}: {name} must be an iterable of grpc.StatusCode, got {codes!r}")
    result = frozenset(codes)
    for code in result:
        if not isinstance(code, grpc.StatusCode) or code is grpc.StatusCode.OK:
            raise ConfigError(f"{owner}: {name} holds {code!r}, not a failing grpc.StatusCode")
    return result
