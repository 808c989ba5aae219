"""Transports behind one small interface (:class:`Backend`).

``local``
    In-process copy rails, optionally throttled (always available).
``sim``
    An emulated fabric in virtual time (see :mod:`tent_async.backends.sim`).
``ucx``
    Real transfers between processes and machines over ucxx (extra ``ucx``).

Backends are imported lazily, so ucxx is loaded only when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from ..rails import RailSpec
from .base import Backend, BackendContext, Cancellable

_BUILTIN = {
    "local": ("tent_async.backends.local", "LocalBackend"),
    "sim": ("tent_async.backends.sim", "SimBackend"),
    "ucx": ("tent_async.backends.ucx", "UcxBackend"),
}


def make_backend(backend: str | Backend, rails: Sequence[RailSpec] | None, **options: Any) -> Backend:
    """A backend instance from its name (with ``rails`` and options) or itself."""
    if isinstance(backend, Backend):
        if rails is not None or options:
            raise ConfigError("pass rails and options to the backend's constructor, not to the Engine")
        return backend
    if not isinstance(backend, str) or backend not in _BUILTIN:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {sorted(_BUILTIN)} or pass a Backend")
    module_name, class_name = _BUILTIN[backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = " (install it with `pip install 'tent_async[ucx]'`)" if backend == "ucx" else ""
        raise ConfigError(f"backend {backend!r} is not available: {exc}{hint}") from exc
    cls = getattr(module, class_name)
    try:
        instance: Backend = cls(rails=rails, **options)
    except TypeError as exc:
        raise ConfigError(f"bad options for backend {backend!r}: {exc}") from exc
    return instance


__all__ = ["Backend", "BackendContext", "Cancellable", "make_backend"]
