"""The lab rig: real QEMU guests with a known memory workload, for tests, benchmarks and the demo.

- `assets`: find the guest kernel and the QEMU binaries, build the dirtier and the initramfs (cached).
- `guest`: `GuestSpec` + `Guest`, one QEMU process (TCG) booted into the dirtier, killed by PID on exit.
- `migration`: a real live migration between two guests on 127.0.0.1 with a typed result.

Nothing here is used by the daemon itself. The host needs `bash scripts/install-rig.sh` once; anything
missing raises `RigError` saying so.
"""

from __future__ import annotations

from migpredictd.core.errors import MigpredictdError

INSTALL_HINT = "run `bash scripts/install-rig.sh` (as root) to install the rig"


class RigError(MigpredictdError):
    """The rig cannot provide a working guest: an asset is missing, QEMU died, or a wait timed out."""


__all__ = ["INSTALL_HINT", "RigError"]
