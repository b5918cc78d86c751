"""Bandwidths, durations and sizes: parsing what people type and formatting what they read. Pure.

Bandwidths in bits per second use the seed's binary multiples (1 Gbps = 2**30 / 8 bytes/s,
100 Mbps = 100 * 2**20 / 8), so our tables line up with the cover letter's; byte rates (``MiB/s``,
``MB/s``) are accepted too. A bare number is bytes per second. Durations: ``125ms``, ``5s``, ``2m``,
``1h``, and ``unlim`` for an unlimited max downtime; a bare number is milliseconds (QEMU's
``downtime-limit`` unit) unless the caller chooses another default.
"""

from __future__ import annotations

import math
import re
from typing import Final

from migpredictd.core.errors import UnitError

_BITS: Final = {"bps": 1, "kbps": 1 << 10, "mbps": 1 << 20, "gbps": 1 << 30, "tbps": 1 << 40}
_BIT_ALIASES: Final = {"bit/s": "bps", "kbit/s": "kbps", "mbit/s": "mbps", "gbit/s": "gbps", "tbit/s": "tbps"}
_BYTES: Final = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SECONDS: Final = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
UNLIMITED: Final = ("unlim", "unlimited", "inf", "none")

_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z/]*)\s*$")


def _split(text: str, what: str) -> tuple[float, str]:
    m = _NUMBER_UNIT.match(text)
    if not m:
        raise UnitError(f"{text!r} is not a {what}: expected a number with an optional unit")
    value = float(m.group(1))
    if not math.isfinite(value):
        raise UnitError(f"{text!r} is not a finite {what}")
    return value, m.group(2).lower()


def parse_bandwidth(text: str | float) -> float:
    """Bytes per second from ``10Gbps``, ``100 Mbps``, ``1.5 GiB/s``, ``125000000`` (bytes/s)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        value, unit = _split(str(text), "bandwidth")
    unit = _BIT_ALIASES.get(unit, unit)
    if unit in ("", "b/s"):
        result = value
    elif unit in _BITS:
        result = value * _BITS[unit] / 8
    elif unit.endswith("/s") and unit[:-2] in _BYTES:
        result = value * _BYTES[unit[:-2]]
    else:
        raise UnitError(f"{text!r}: unknown bandwidth unit {unit!r} (use Mbps, Gbps, MiB/s, MB/s, ...)")
    if not (result > 0 and math.isfinite(result)):
        raise UnitError(f"{text!r}: a bandwidth must be positive")
    return result


def parse_duration(text: str | float, *, default_unit: str = "ms", allow_unlimited: bool = False) -> float:
    """Seconds from ``500ms``, ``5s``, ``2m``; ``unlim`` is inf when ``allow_unlimited``."""
    if isinstance(text, str) and text.strip().lower() in UNLIMITED:
        if not allow_unlimited:
            raise UnitError(f"{text!r}: an unlimited duration is not allowed here")
        return math.inf
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        value, unit = _split(str(text), "duration")
    unit = unit or default_unit
    if unit not in _SECONDS:
        raise UnitError(f"{text!r}: unknown duration unit {unit!r} (use ms, s, m, h)")
    result = value * _SECONDS[unit]
    if not (result >= 0 and math.isfinite(result)):
        raise UnitError(f"{text!r}: a duration must be a non-negative number")
    return result


def parse_size(text: str | int) -> int:
    """Bytes from ``512MiB``, ``2G`` (binary), ``4096``."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise UnitError(f"{text!r}: a size must be non-negative")
        return text
    value, unit = _split(str(text), "size")
    unit = {"k": "kib", "m": "mib", "g": "gib", "t": "tib"}.get(unit, unit)
    if unit not in ("", *_BYTES):
        raise UnitError(f"{text!r}: unknown size unit {unit!r} (use KiB, MiB, GiB)")
    result = value * _BYTES.get(unit, 1)
    # A finite number times a unit can still overflow (1e300TiB); int(inf) would raise OverflowError.
    if not math.isfinite(result):
        raise UnitError(f"{text!r} is not a finite size")
    return int(result)


def _trim(value: float) -> str:
    return f"{value:.6g}"


def format_bandwidth(bytes_per_second: float, *, space: bool = False) -> str:
    """``1Gbps``, ``2.5Gbps``, ``100Mbps`` (binary multiples, as parsed); with ``space``: ``1 Gbps``."""
    bits = bytes_per_second * 8
    unit, scale = "bps", 1
    for name, factor in _BITS.items():
        if bits >= factor:
            unit, scale = name, factor
    label = unit[0].upper() + unit[1:] if unit != "bps" else unit
    return f"{_trim(bits / scale)}{' ' if space else ''}{label}"


def format_downtime(seconds: float) -> str:
    """``125ms``, ``5000ms``, ``unlim``: max downtimes in QEMU's unit, as the seed's table shows them."""
    if math.isinf(seconds):
        return "unlim"
    return f"{_trim(seconds * 1000.0)}ms"


def format_eta(seconds: float) -> str:
    """``16m59s``, ``48s``, ``-`` (does not converge), rounding up to whole seconds like the seed."""
    if not math.isfinite(seconds):  # nan: does not converge; inf (found by fuzzing): never finishes
        return "-"
    total = math.ceil(seconds)
    minutes, secs = divmod(total, 60)
    return f"{minutes}m{secs:02d}s" if minutes > 0 else f"{secs}s"
