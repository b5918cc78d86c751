"""Host-side estimates of a guest's zero pages, read from the QEMU process on this hypervisor.

Why it matters: pre-copy sends a zero page as a 9-byte marker and any other page as 4104 bytes, and an
idle guest is mostly zero (a 512 MiB guest sent only 95 MiB of non-zero pages). Upstream
``calc-dirty-rate`` does not count zero pages, so we look at the QEMU process instead:

- ``host-smaps`` (the fallback of ``auto``, the default, when guest pages cannot be read): guest RAM is
  one anonymous mapping of the guest's memory size in QEMU;
  a page the guest never wrote is not resident there, so ``Rss + Swap`` of that mapping bounds the
  non-zero pages from above, and ``total - resident`` is a *lower* bound on zero pages. Conservative
  (the prediction can only err long), reads no guest data. It over-counts pages the guest wrote and
  later zeroed, and with transparent huge pages it rounds residency up to 2 MiB.
- ``guest-sample`` (tried first by ``auto``, the default): read a uniform random sample of guest pages
  from ``/proc/PID/mem`` and count the all-zero ones. Much closer to what migration sees; it reads
  guest memory contents only to test each page for zero (nothing is kept), and ``zero_pages:
  host-smaps`` turns it off.

Both need the QEMU PID (``SO_PEERCRED`` of the QMP unix socket) and root or the QEMU user's rights on
``/proc/PID``. An unprivileged daemon gets them from the zero-page helper
(:mod:`migpredictd.qemu.zerohelper`), which runs these same functions with those rights.

- ``host-status`` (the unprivileged fallback, when neither works): ``RssAnon + RssShmem + VmSwap`` of the
  whole QEMU process from ``/proc/PID/status``, which every user may read. Like ``host-smaps`` it bounds
  the non-zero pages from above, more loosely: QEMU's own heap and code buffers count as guest pages.

Where none works they raise :class:`ZeroPagesUnavailableError` and the caller records "unknown".
"""

from __future__ import annotations

import mmap
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from migpredictd.core.errors import ZeroPagesUnavailableError
from migpredictd.qemu.settings import DEFAULT_GUEST_SAMPLE_PAGES

# Slices of guest RAM the zero share is also reported for (Measurement.zero_profile). QEMU sends the
# first pass in address order, so where the zero pages lie decides what is left for the unthrottled
# stop-and-copy (docs/accuracy.md, round 5). 64 slices of 256 samples each at the default: the share
# of a slice to about +-3%, and the profile says nothing finer than 1/64 of RAM about the guest.
PROFILE_BINS: Final = 64

_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)$")


@dataclass(frozen=True, slots=True)
class Mapping:
    """One region of the QEMU process's address space (adjacent VMAs of the same kind merged)."""

    start: int
    end: int
    perms: str
    path: str
    rss_bytes: int
    swap_bytes: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class ZeroPageEstimate:
    """Estimated zero pages of a guest, how they were found, and where guest RAM was."""

    zero_pages: float
    method: str
    mapping: Mapping | None  # None for host-status, which reads no mappings
    detail: str
    # guest-sample only: the zero share of PROFILE_BINS equal slices of guest RAM, in address order.
    profile: tuple[float, ...] | None = None
    # guest-sample only: how many of the zero pages are allocated memory (written and zeroed again, or
    # swapped out) rather than never written (the kernel's shared zero page); None when the page map
    # could not be read. QEMU's migration thread reads the allocated kind several times slower.
    allocated_zero_pages: float | None = None


def read_smaps(pid: int, *, proc: Path = Path("/proc")) -> list[Mapping]:
    """The private writable regions of process ``pid`` with their Rss and Swap, merged when adjacent.

    QEMU may split guest RAM into several VMAs (madvise, KSM, THP), so adjacent rw regions with the same
    backing are merged before they are compared with the guest's size.

    :raises ZeroPagesUnavailableError: when smaps cannot be read.
    """
    try:
        text = (proc / str(pid) / "smaps").read_text()
    except OSError as exc:
        raise ZeroPagesUnavailableError(f"cannot read /proc/{pid}/smaps: {exc.strerror or exc}") from exc
    regions: list[Mapping] = []
    current: dict[str, object] | None = None

    def flush() -> None:
        if current is None:
            return
        m = Mapping(
            start=int(str(current["start"])),
            end=int(str(current["end"])),
            perms=str(current["perms"]),
            path=str(current["path"]),
            rss_bytes=int(str(current.get("Rss", 0))),
            swap_bytes=int(str(current.get("Swap", 0))),
        )
        if regions and _mergeable(regions[-1], m):
            last = regions.pop()
            m = Mapping(
                last.start,
                m.end,
                m.perms,
                m.path,
                last.rss_bytes + m.rss_bytes,
                last.swap_bytes + m.swap_bytes,
            )
        regions.append(m)

    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            flush()
            start, end, perms, path = header.groups()
            current = {"start": int(start, 16), "end": int(end, 16), "perms": perms, "path": path.strip()}
            continue
        if current is None:
            continue
        key, _, value = line.partition(":")
        if key in ("Rss", "Swap"):
            parts = value.split()
            if parts and parts[0].isdigit():
                current[key] = int(parts[0]) * 1024  # smaps reports kB
    flush()
    return regions


def _mergeable(a: Mapping, b: Mapping) -> bool:
    return a.end == b.start and a.perms == b.perms and a.path == b.path


def _is_ram_candidate(m: Mapping) -> bool:
    # Guest RAM is readable and writable, never executable (the TCG code buffer is rwx and often larger
    # than the guest); anonymous, or a memfd/hugetlbfs file when a memory backend asked for one.
    if m.perms[0] != "r" or m.perms[1] != "w" or m.perms[2] == "x":
        return False
    return m.path == "" or m.path.startswith(("/memfd:", "/dev/hugepages", "/dev/shm/"))  # noqa: S108 (matched, not created)


def find_guest_ram(regions: list[Mapping], memory_bytes: int) -> Mapping:
    """The region holding guest RAM: exactly the guest's size, else the smallest larger candidate.

    :raises ZeroPagesUnavailableError: when no region is large enough (wrong PID, or RAM split into backends).
    """
    candidates = [m for m in regions if _is_ram_candidate(m) and m.size >= memory_bytes]
    exact = [m for m in candidates if m.size == memory_bytes]
    if len(exact) == 1:
        return exact[0]
    pool = exact or candidates
    if not pool:
        raise ZeroPagesUnavailableError(
            f"no anonymous rw mapping of at least {memory_bytes} bytes (is this PID the guest's QEMU?)"
        )
    # Several equal ones (e.g. a second RAM backend): take the most resident; ties by smallest size.
    return min(pool, key=lambda m: (m.size, -m.rss_bytes))


def smaps_estimate(
    pid: int, *, memory_bytes: int, page_size: int = 4096, proc: Path = Path("/proc")
) -> ZeroPageEstimate:
    """``host-smaps``: zero pages >= guest pages not resident (nor swapped) in QEMU's guest-RAM mapping.

    :raises ZeroPagesUnavailableError: when smaps cannot be read or guest RAM is not found.
    """
    ram = find_guest_ram(read_smaps(pid, proc=proc), memory_bytes)
    total_pages = memory_bytes // page_size
    # Over a larger-than-RAM region, residency beyond the guest's size cannot be told apart: cap it.
    nonzero_pages = min(total_pages, -(-(ram.rss_bytes + ram.swap_bytes) // page_size))
    zero = float(total_pages - nonzero_pages)
    return ZeroPageEstimate(
        zero_pages=zero,
        method="host-smaps",
        mapping=ram,
        allocated_zero_pages=0.0,  # a page counted zero here was never written: not resident
        detail=(
            f"guest RAM mapping {ram.size >> 20} MiB in PID {pid}: {ram.rss_bytes >> 20} MiB resident, "
            f"{ram.swap_bytes >> 20} MiB swapped"
        ),
    )


def guest_sample_estimate(
    pid: int,
    *,
    memory_bytes: int,
    page_size: int = 4096,
    samples: int = DEFAULT_GUEST_SAMPLE_PAGES,
    seed: int | None = None,
    proc: Path = Path("/proc"),
) -> ZeroPageEstimate:
    """``guest-sample``: read ``samples`` random guest pages from ``/proc/PID/mem``; scale the zero share.

    Reads guest memory contents, only to test each page for zero. A page never touched reads as zeros
    without being allocated. Standard error of the zero share is at most ``0.5 / sqrt(samples)``
    (0.4 % at 16384).

    :raises ZeroPagesUnavailableError: when guest RAM is not found or ``/proc/PID/mem`` cannot be read.
    """
    if samples <= 0:
        raise ValueError("samples must be positive")
    ram = find_guest_ram(read_smaps(pid, proc=proc), memory_bytes)
    total_pages = memory_bytes // page_size
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(total_pages), min(samples, total_pages)))
    zero_page = bytes(page_size)
    zero_flags: list[bool] = []
    # The page map first: reading a never-written page through /proc/PID/mem maps the shared zero page.
    allocated_flags = _allocated(pid, [ram.start + index * page_size for index in picks], proc)
    try:
        fd = os.open(proc / str(pid) / "mem", os.O_RDONLY)
    except OSError as exc:
        raise ZeroPagesUnavailableError(f"cannot open /proc/{pid}/mem: {exc.strerror or exc}") from exc
    try:
        for index in picks:
            data = os.pread(fd, page_size, ram.start + index * page_size)
            if len(data) != page_size:
                raise ZeroPagesUnavailableError(f"short read of guest page {index} from /proc/{pid}/mem")
            zero_flags.append(data == zero_page)
    except OSError as exc:
        raise ZeroPagesUnavailableError(f"cannot read /proc/{pid}/mem: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    zeros = sum(zero_flags)
    share = zeros / len(picks)
    bins = min(PROFILE_BINS, total_pages)
    seen, zero_seen = [0] * bins, [0] * bins
    for index, is_zero in zip(picks, zero_flags, strict=True):
        b = index * bins // total_pages
        seen[b] += 1
        zero_seen[b] += is_zero
    profile = tuple(zero_seen[b] / seen[b] if seen[b] else share for b in range(bins))
    allocated: float | None = None
    detail = f"{zeros} of {len(picks)} sampled guest pages were zero (PID {pid})"
    if allocated_flags is not None:
        allocated_zeros = sum(z and a for z, a in zip(zero_flags, allocated_flags, strict=True))
        allocated = allocated_zeros / len(picks) * total_pages
        detail += f", {allocated_zeros} of them allocated memory"
    return ZeroPageEstimate(
        zero_pages=share * total_pages,
        method="guest-sample",
        mapping=ram,
        detail=detail,
        profile=profile,
        allocated_zero_pages=allocated,
    )


# /proc/PID/pagemap: one little-endian 64-bit entry per virtual page (the kernel's admin-guide/mm/pagemap).
_PM_PRESENT: Final = 1 << 63
_PM_SWAPPED: Final = 1 << 62
_PM_EXCLUSIVE: Final = 1 << 56  # mapped by this process only: never set for the shared zero page


def _allocated(pid: int, addresses: Sequence[int], proc: Path) -> list[bool] | None:
    """Per address, whether its page is allocated memory of its own (swapped out, or present and mapped
    exclusively); None if the page map cannot be read. Reading it needs the same ptrace-read access as
    ``/proc/PID/mem``; physical frame numbers, which need more, are not used."""
    try:
        fd = os.open(proc / str(pid) / "pagemap", os.O_RDONLY)
    except OSError:
        return None
    flags: list[bool] = []
    try:
        for address in addresses:
            entry = os.pread(fd, 8, address // mmap.PAGESIZE * 8)  # entries are per host page
            if len(entry) != 8:
                return None
            value = int.from_bytes(entry, "little")
            flags.append(
                bool(value & _PM_SWAPPED)
                or (value & (_PM_PRESENT | _PM_EXCLUSIVE)) == (_PM_PRESENT | _PM_EXCLUSIVE)
            )
    except OSError:
        return None
    finally:
        os.close(fd)
    return flags


def status_estimate(
    pid: int, *, memory_bytes: int, page_size: int = 4096, proc: Path = Path("/proc")
) -> ZeroPageEstimate:
    """``host-status``: zero pages >= guest pages minus QEMU's resident anonymous, shared and swapped memory.

    ``/proc/PID/status`` is readable by every user who can see the PID, so this needs no privilege. It
    is a lower bound on zero pages, looser than ``host-smaps``: QEMU's own allocations count as guest
    pages, and pages the guest wrote and later zeroed stay resident.

    :raises ZeroPagesUnavailableError: when the status cannot be read or lacks the fields.
    """
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError as exc:
        raise ZeroPagesUnavailableError(f"cannot read /proc/{pid}/status: {exc.strerror or exc}") from exc
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if (
            key in ("RssAnon", "RssShmem", "VmSwap")
            and len(parts) == 2
            and parts[0].isdigit()
            and parts[1] == "kB"
        ):
            fields[key] = int(parts[0]) * 1024
    if "RssAnon" not in fields:
        raise ZeroPagesUnavailableError(f"/proc/{pid}/status has no RssAnon (kernel older than 4.5?)")
    total_pages = memory_bytes // page_size
    used = fields["RssAnon"] + fields.get("RssShmem", 0) + fields.get("VmSwap", 0)
    nonzero_pages = min(total_pages, -(-used // page_size))
    return ZeroPageEstimate(
        zero_pages=float(total_pages - nonzero_pages),
        method="host-status",
        mapping=None,
        allocated_zero_pages=0.0,  # as host-smaps: only pages that are not resident count as zero
        detail=(
            f"PID {pid}: {fields['RssAnon'] >> 20} MiB anonymous, "
            f"{fields.get('RssShmem', 0) >> 20} MiB shared, {fields.get('VmSwap', 0) >> 20} MiB swapped "
            "(all of QEMU, not only guest RAM)"
        ),
    )


def guest_name_matches(argv: Sequence[bytes], name: bytes) -> bool:
    """Whether QEMU's ``argv`` has ``-name guest=NAME,...`` for ``name`` (libvirt doubles a comma in it)."""
    for i, arg in enumerate(argv[:-1]):
        if arg == b"-name":
            value = argv[i + 1].replace(b",,", b"\0").split(b",")[0].replace(b"\0", b",")
            if value == b"guest=" + name:
                return True
    return False


__all__ = [
    "DEFAULT_GUEST_SAMPLE_PAGES",
    "Mapping",
    "ZeroPageEstimate",
    "ZeroPagesUnavailableError",
    "find_guest_ram",
    "guest_name_matches",
    "guest_sample_estimate",
    "read_smaps",
    "smaps_estimate",
    "status_estimate",
]
