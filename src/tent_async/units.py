"""Human-readable sizes, bandwidths and durations.

Configuration is written by people (``bandwidth="2GB/s"``, ``latency="5us"``),
the core computes in plain floats (bytes, bytes per second, seconds).  These
converters sit at the boundary so that nothing inside ever sees a string.

Conventions follow networking practice: ``B`` is a byte and ``b``/``bit`` is a
bit; ``K/M/G/T`` are powers of 1000 and ``Ki/Mi/Gi/Ti`` powers of 1024.

Every converter raises :class:`~tent_async.errors.ConfigError` (a ``ValueError``)
for a value it cannot read, so a bad setting is a ``TentError`` like every
other error of the library.
"""

from __future__ import annotations

import math
import re

from .errors import ConfigError

_PREFIX = {
    "": 1.0,
    "k": 1e3,
    "K": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 1024.0,
    "Mi": 1024.0**2,
    "Gi": 1024.0**3,
    "Ti": 1024.0**4,
}

_SIZE_RE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKMGT]i?)?\s*(B|b|bit|bits)?\s*$")
_RATE_RE = re.compile(
    r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtT]i?)?\s*(B|b|bit|bits|bps)?\s*(/\s*s|ps)?\s*$"
)
_TIME_RE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ns|us|µs|ms|s)?\s*$")
_TIME_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}


def _norm_prefix(prefix: str | None) -> float:
    if not prefix:
        return 1.0
    # tc and many tools write "mbit"/"gbit": accept a lower-case decimal prefix.
    key = prefix if prefix in _PREFIX else prefix[0].upper() + prefix[1:]
    return _PREFIX[key]


def parse_size(value: int | float | str) -> int:
    """Return a byte count from ``4096``, ``"64MiB"``, ``"1.5GB"``.

    Raises :class:`~tent_async.errors.ConfigError` (a ``ValueError``) for
    negative sizes, bits, or unknown units.
    """
    if isinstance(value, bool):
        raise ConfigError(f"size must be a number of bytes or a string like '64MiB', got {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m or m.group(3) in ("b", "bit", "bits"):
            raise ConfigError(f"cannot read {value!r} as a size; write e.g. 4096, '64KiB', '16MiB' or '1GB'")
        number = float(m.group(1)) * _norm_prefix(m.group(2))
    else:
        raise ConfigError(f"size must be a number of bytes or a string like '64MiB', got {type(value).__name__}")
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"size must be a finite, non-negative number of bytes, got {value!r}")
    return round(number)


def parse_bandwidth(value: int | float | str) -> float:
    """Return bytes per second from ``2e9``, ``"2GB/s"``, ``"400Gb/s"``, ``"800mbit"``.

    A plain number is bytes per second.  In strings ``B`` means bytes and
    ``b``/``bit``/``bps`` bits.  Bytes need a per-second unit (``"1GB"`` is
    an amount, refused; write ``"1GB/s"``); bits are rates as in ``tc``
    (``"800mbit"``).  Zero, negative and non-finite rates are refused.
    """
    if isinstance(value, bool):
        raise ConfigError(f"bandwidth must be bytes/s or a string like '2GB/s', got {value!r}")
    if isinstance(value, int | float):
        rate = float(value)
    elif isinstance(value, str):
        m = _RATE_RE.match(value)
        if not m:
            raise ConfigError(
                f"cannot read {value!r} as a bandwidth; write e.g. '2GB/s' (bytes), '400Gb/s' or '800mbit' (bits)"
            )
        unit = m.group(3) or "B"
        bits = unit in ("b", "bit", "bits", "bps")
        if m.group(3) == "B" and not m.group(4):
            # "1GB" is an amount, not a rate: refuse rather than guess what was meant.
            raise ConfigError(
                f"{value!r} is an amount of bytes, not a rate; a bandwidth needs a per-second unit: "
                f"write e.g. '{value.strip()}/s' (bytes per second) or '800mbit' (bits per second)"
            )
        rate = float(m.group(1)) * _norm_prefix(m.group(2)) / (8.0 if bits else 1.0)
    else:
        raise ConfigError(f"bandwidth must be bytes/s or a string like '2GB/s', got {type(value).__name__}")
    if not math.isfinite(rate):
        raise ConfigError(f"a bandwidth must be finite, got {value!r}")
    if not rate > 0:
        raise ConfigError(f"a bandwidth must be positive (bytes/s > 0), got {value!r}")
    return rate


def parse_duration(value: int | float | str) -> float:
    """Return seconds from ``0.001``, ``"1ms"``, ``"5us"``."""
    if isinstance(value, bool):
        raise ConfigError(f"duration must be seconds or a string like '5us', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _TIME_RE.match(value)
        if not m:
            raise ConfigError(f"cannot read {value!r} as a duration; write e.g. '5us', '2ms' or 0.5 (seconds)")
        seconds = float(m.group(1)) * _TIME_UNIT[m.group(2)]
    else:
        raise ConfigError(f"duration must be seconds or a string like '5us', got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"duration must be finite and not negative, got {value!r}")
    return seconds


def format_size(n: float) -> str:
    """``67108864`` -> ``'64.0 MiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024.0:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TiB"


def format_rate(bytes_per_s: float) -> str:
    """``2e9`` -> ``'2.00 GB/s'`` (decimal, as link speeds are quoted)."""
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("KB/s", 1e3)):
        if abs(bytes_per_s) >= scale:
            return f"{bytes_per_s / scale:.2f} {unit}"
    return f"{bytes_per_s:.0f} B/s"
