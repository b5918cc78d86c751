"""The measurement settings and their limits: one definition for the config, the CLI and the QEMU edge.

Pure (no I/O): :mod:`migpredictd.config.schema` builds :class:`MeasureSettings` from YAML,
:mod:`migpredictd.qemu.measure` from its flags, and both use the limits below. docs/measuring.md gives
the measurements behind each default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from migpredictd.core.errors import InputError

__all__ = [
    "DEFAULT_GUEST_SAMPLE_PAGES",
    "DEFAULT_HELPER_SOCKET",
    "DEFAULT_MAX_SWEEPS",
    "DEFAULT_PERIODS_MS",
    "DEFAULT_SAMPLE_PAGES",
    "DEFAULT_TARGET_SAMPLING_ERROR",
    "MAX_CALC_MS",
    "MAX_GUEST_SAMPLE_PAGES",
    "MAX_LIBVIRT_WINDOW_SECONDS",
    "MAX_SAMPLE_PAGES",
    "MAX_SWEEPS",
    "MIN_CALC_MS",
    "MIN_SAMPLE_PAGES",
    "SAMPLES_PER_RUN",
    "SAMPLES_PER_RUN_BEFORE_8_2",
    "STRATEGIES",
    "ZERO_PAGE_METHODS",
    "MeasureSettings",
    "auto_sample_pages",
    "libvirt_windows",
]

STRATEGIES: Final = ("auto", "extended", "sweep-ms", "sweep-s")
ZERO_PAGE_METHODS: Final = ("auto", "guest-sample", "helper", "host-smaps", "host-status", "none")

# A sweep must reach about as long as the first migration pass to see a working set that fills up
# later, and each run costs its whole period in wall time, so the periods double.
DEFAULT_PERIODS_MS: Final[Mapping[str, tuple[float, ...]]] = {
    "sweep-ms": (125.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0),
    "sweep-s": (1000.0, 2000.0, 4000.0, 8000.0),
    "extended": (8000.0,),  # one run; QEMU reports its own periods up to this calc-time
}
# calc-dirty-rate's sample-pages, per GiB of guest memory. QEMU hashes every sampled page twice per run,
# so a run's cost grows with the guest at a fixed per-GiB count: by default each guest gets the pages per
# GiB that put SAMPLES_PER_RUN pages in one run (QEMU's maximum, 16384 per GiB, up to 8 GiB on 8.2+),
# which bounds both the cost and the first hash pass (which stretches a short window) whatever the size
# (docs/measuring.md, "sample-pages").
DEFAULT_SAMPLE_PAGES: Final = 16384
MIN_SAMPLE_PAGES: Final = 128  # QEMU's limits
MAX_SAMPLE_PAGES: Final = 16384
# Pages hashed per pass of one run, by QEMU generation: 8.2+ (xxhash, millisecond windows from 125 ms)
# and older (crc32, about 3x slower, whole seconds). docs/measuring.md has the cost per page.
SAMPLES_PER_RUN: Final = 131072
SAMPLES_PER_RUN_BEFORE_8_2: Final = 65536


def auto_sample_pages(memory_bytes: int, *, calc_time_unit: bool) -> int:
    """calc-dirty-rate's sample-pages (per GiB) for a guest of ``memory_bytes``: as many as fit in the
    generation's pages per run, within QEMU's 128..16384."""
    budget = SAMPLES_PER_RUN if calc_time_unit else SAMPLES_PER_RUN_BEFORE_8_2
    per_gib = (budget << 30) // max(memory_bytes, 1)
    return max(MIN_SAMPLE_PAGES, min(MAX_SAMPLE_PAGES, per_gib))


MIN_CALC_MS: Final = 50.0  # calc-time-unit millisecond's range (QEMU 8.2+)
MAX_CALC_MS: Final = 60000.0
# Guest pages the guest-sample zero-page estimate reads: its error is binomial, so more samples are the
# fix, and the cost stays tens of milliseconds (docs/measuring.md, "Zero pages").
DEFAULT_GUEST_SAMPLE_PAGES: Final = 16384
MAX_GUEST_SAMPLE_PAGES: Final = 1 << 20
# virDomainStartDirtyRateCalc takes whole seconds of 1..60.
MAX_LIBVIRT_WINDOW_SECONDS: Final = 60


def libvirt_windows(periods_ms: Sequence[float] | None) -> list[int]:
    """The whole-second windows of one libvirt sweep for ``periods_ms`` (None: the ``sweep-s`` defaults).

    :raises InputError: a period that is not a whole number of seconds in 1..60 (names its index).
    """
    periods = list(periods_ms) if periods_ms is not None else list(DEFAULT_PERIODS_MS["sweep-s"])
    for i, ms in enumerate(periods):
        if ms % 1000 or not 1000 <= ms <= MAX_LIBVIRT_WINDOW_SECONDS * 1000:
            raise InputError(
                f"libvirt measures whole seconds of 1..{MAX_LIBVIRT_WINDOW_SECONDS} s, not {ms:g} ms",
                field=f"periods_ms[{i}]",
            )
    return [int(ms // 1000) for ms in periods]


# libvirt's sweep: see MeasureSettings.target_sampling_error.
DEFAULT_TARGET_SAMPLING_ERROR: Final = 0.1
DEFAULT_MAX_SWEEPS: Final = 4
MAX_SWEEPS: Final = 16

# Where the unprivileged daemon finds the zero-page helper (migpredictd-zeropaged) with no flags.
DEFAULT_HELPER_SOCKET: Final = "/run/migpredictd/zeropages.sock"


@dataclass(frozen=True, kw_only=True)
class MeasureSettings:
    """How to measure one target: the one definition, built by the YAML config and by ``measure``'s flags.

    Frozen; every field is validated (:class:`~migpredictd.core.errors.InputError` names it).
    """

    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    strategy: str = "auto"
    periods_ms: tuple[float, ...] | None = None  # None: DEFAULT_PERIODS_MS of the chosen strategy
    sample_pages: int | None = None  # per GiB, as calc-dirty-rate's sample-pages; None: auto_sample_pages
    zero_pages: str = "auto"
    guest_sample_pages: int = DEFAULT_GUEST_SAMPLE_PAGES
    zero_pages_helper: str = DEFAULT_HELPER_SOCKET
    poll_interval: float = 0.05
    # How long past calc-time QEMU may take to say "measured" (it normally answers within milliseconds).
    settle_timeout: float = 10.0
    # libvirt only (it passes neither sample-pages nor milliseconds on, so QEMU samples 512 pages per GiB):
    # repeat the whole-second sweep until the dirty pages at its shortest period have at most this
    # relative sampling error, or max_sweeps sweeps ran (docs/measuring.md, "libvirt").
    target_sampling_error: float = DEFAULT_TARGET_SAMPLING_ERROR
    max_sweeps: int = DEFAULT_MAX_SWEEPS

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "command_timeout", "poll_interval", "settle_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise InputError(f"must be a positive number of seconds, got {value!r}", field=name)
        if self.strategy not in STRATEGIES:
            raise InputError(f"must be one of {', '.join(STRATEGIES)}", field="strategy")
        if self.zero_pages not in ZERO_PAGE_METHODS:
            raise InputError(f"must be one of {', '.join(ZERO_PAGE_METHODS)}", field="zero_pages")
        if self.sample_pages is not None and not MIN_SAMPLE_PAGES <= self.sample_pages <= MAX_SAMPLE_PAGES:
            raise InputError(f"must be in {MIN_SAMPLE_PAGES}..{MAX_SAMPLE_PAGES}", field="sample_pages")
        if not (self.zero_pages_helper.startswith("/") and len(self.zero_pages_helper.encode()) <= 107):
            raise InputError(
                "must be an absolute unix socket path of at most 107 bytes", field="zero_pages_helper"
            )
        if not (
            isinstance(self.target_sampling_error, int | float)
            and math.isfinite(self.target_sampling_error)
            and 0.0 < self.target_sampling_error <= 1.0
        ):
            raise InputError("must be a share in (0, 1]", field="target_sampling_error")
        if not 1 <= self.max_sweeps <= MAX_SWEEPS:
            raise InputError(f"must be in 1..{MAX_SWEEPS}", field="max_sweeps")
        if not 1 <= self.guest_sample_pages <= MAX_GUEST_SAMPLE_PAGES:
            raise InputError(f"must be in 1..{MAX_GUEST_SAMPLE_PAGES}", field="guest_sample_pages")
        if self.periods_ms is not None:
            if not self.periods_ms:
                raise InputError("needs at least one period", field="periods_ms")
            previous = 0.0
            for i, p in enumerate(self.periods_ms):
                if not (MIN_CALC_MS <= p <= MAX_CALC_MS) or p <= previous:
                    raise InputError(
                        f"periods must increase strictly within {MIN_CALC_MS:g}..{MAX_CALC_MS:g} ms",
                        field=f"periods_ms[{i}]",
                    )
                previous = p
