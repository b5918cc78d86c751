"""The QEMU edge: the QMP client, the measurement strategies and the zero-page estimate.

Everything that talks to a QEMU process (its monitor socket or its /proc entries) lives here and returns
core types (`migpredictd.core.measurement.Measurement`).
"""
