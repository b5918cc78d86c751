"""The privileged helper: tiny, no network, one question (zero pages of a QEMU process); docs/security.md."""
