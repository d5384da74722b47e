"""Checks of the arguments of tpfx's public functions: one line naming the function, the argument, the value
and the fix, raised as :class:`tpfx.errors.ConfigError` before the function does anything.

Python's own errors for a wrong type (``'<' not supported between instances of 'str' and 'int'``,
``'dict' object has no attribute 'named_parameters'``) name neither the argument nor the fix, and
some wrong values pass silently (``tp=True`` is the integer 1); these checks come first instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from tpfx.errors import ConfigError


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def require_module(value: object, name: str, where: str) -> nn.Module:
    """``value`` if it is an ``nn.Module``; else a ConfigError."""
    if not isinstance(value, nn.Module):
        raise ConfigError(f"{where}: {name} must be a torch.nn.Module, got {_shown(value)} "
                          f"({type(value).__name__}); fix: pass the model (or the program tpfx.parallelize returned)")
    return value


def require_count(value: object, name: str, where: str, *, optional: bool = False, minimum: int = 1) -> int | None:
    """``value`` if it is an int >= ``minimum`` (None too when ``optional``); bools, floats and strings are refused."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        hint = f"; fix: pass {name}={int(value)}" if isinstance(value, float) and value.is_integer() else \
               f"; fix: pass {name}={value.strip()}" if isinstance(value, str) and value.strip().isdigit() else \
               f"; fix: pass an int >= {minimum}"
        raise ConfigError(f"{where}: {name} must be an int >= {minimum}, got {_shown(value)} "
                          f"({type(value).__name__}){hint}")
    if value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer" if minimum == 0 else f">= {minimum}"
        raise ConfigError(f"{where}: {name}={value} must be {kind}; fix: pass an int >= {minimum}")
    return value


def require_bool(value: object, name: str, where: str) -> bool:
    """``value`` if it is a bool (not an int or a string that reads like one)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {name} must be True or False, got {_shown(value)} ({type(value).__name__})")
    return value


def require_choice(value: object, name: str, where: str, choices: tuple[str, ...], *, kind: str) -> str:
    """``value`` if it is one of the strings ``choices`` (``kind`` says what they are, e.g. "a tracer")."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{where}: {name}={_shown(value)} is not {kind}; use one of {', '.join(map(repr, choices))}")
    return value


def require_device(value: object, name: str, where: str) -> torch.device:
    """``value`` as a ``torch.device`` (a device or its string); else a ConfigError."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:
            pass
    raise ConfigError(f"{where}: {name}={_shown(value)} is not a device; fix: pass 'cpu', 'cuda:0' or a torch.device")


def require_source(value: object, name: str, where: str) -> Mapping | Path:
    """A state dict (a mapping) as it is, or a path (whether it exists is the loader's check)."""
    if isinstance(value, Mapping):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{where}: {name} must be a state dict or the path of a checkpoint file or directory, got "
                          f"{_shown(value)} ({type(value).__name__})")
    return Path(value)
