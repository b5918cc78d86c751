"""The daemon: scheduling, the latest state per target, the Prometheus collector, logs and the wiring.

It uses the core, the QEMU edge, the config and the HTTP server; it never imports the lab.
"""
