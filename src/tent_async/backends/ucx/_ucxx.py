"""Loading ucxx lazily, and the few low-level helpers every module shares.

``import ucxx`` takes about half a second and writes UCX defaults into
``os.environ`` (``UCX_MAX_RNDV_RAILS=1``, ``UCX_RNDV_THRESH=8192``, ...), so it
happens only when a ucx backend starts, never at ``import tent_async``.
Before the import, ``UCX_WARN_UNUSED_ENV_VARS=n`` silences the warning every
UCX context would otherwise print about ucxx's own ``UCX_MEMTYPE_CACHE``, and
``UCX_LOG_LEVEL=error`` keeps UCX from printing a warning (with a backtrace)
to stdout for every active-message or stream fragment that arrives at a
worker without those features: anyone who reaches a UCX port could otherwise
flood our stdout.  ``UCX_LOG_FILE=stderr``: UCX's error lines (some of which a
peer can provoke) go to stderr, never into the application's stdout.  Values
the user set explicitly are left alone.

We use the Cython layer (``ucxx._lib.libucxx``) directly, not
``ApplicationContext``: only the first ``ApplicationContext`` of an event loop
gets a progress thread, and we need one context per rail.
"""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace
from typing import Any

_lock = threading.Lock()
_loaded: SimpleNamespace | None = None


def load() -> SimpleNamespace:
    """Import ucxx once; returns ``L`` (libucxx), ``Array``, ``notifier`` and ``UCXError``.

    Raises ImportError with an install hint when ucxx is missing.
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        os.environ.setdefault("UCX_LOG_LEVEL", "error")
        # UCX logs to stdout by default: a peer whose worker address makes UCX log an error
        # (it refuses another host's loopback address, for instance) would write into the
        # application's stdout.  stderr is where diagnostics belong.
        os.environ.setdefault("UCX_LOG_FILE", "stderr")
        # ucxx's own C++ warnings: in a flood of unexpected messages it printed "No Futures
        # available during getFuture()" about 1,500 times per 100,000 messages, a log line any
        # host that reaches a UCX port can provoke (issue 11 review: rate-limit those).
        os.environ.setdefault("UCXX_LOG_LEVEL", "ERROR")
        try:
            import ucxx  # noqa: F401  (sets UCX_* defaults, loads libucx)
            import ucxx._lib.libucxx as libucxx
            from ucxx._lib.arr import Array
            from ucxx._lib_async.notifier_thread import _notifierThread
        except ImportError as exc:
            raise ImportError(f"{exc}; install the ucx extra: pip install 'tent_async[ucx]'") from exc
        _loaded = SimpleNamespace(
            L=libucxx,
            Array=Array,
            notifier=_notifierThread,
            UCXError=libucxx.UCXError,
            CanceledError=libucxx.UCXCanceledError,
            version=".".join(map(str, libucxx.get_ucx_version())),
        )
        return _loaded


def loaded() -> SimpleNamespace:
    """The ucxx bindings, which :func:`load` must have imported already."""
    if _loaded is None:
        raise RuntimeError("ucxx is not loaded yet; the ucx backend loads it when the engine starts")
    return _loaded


def available() -> str | None:
    """``None`` if ucxx can be loaded here, otherwise the reason it cannot."""
    try:
        load()
    except Exception as exc:  # ImportError, or a broken libucx (OSError)
        return f"{type(exc).__name__}: {exc}"
    return None


def describe_error(exc: BaseException | None) -> str:
    """A UCX error as people read it: ``UCXXConnectionResetError: Connection reset by remote peer``."""
    if exc is None:
        return "unknown error"
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def future_error(future: Any) -> BaseException | None:
    """The exception of a finished request future (also marks it retrieved), or None."""
    if future.cancelled():
        return RuntimeError("request future cancelled")
    exc: BaseException | None = future.exception()
    return exc
