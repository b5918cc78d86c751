"""Test and benchmark helpers that stand in for real QEMU (lab code, never imported by the daemon).

``migpredictd.testing.fakeqmp``: a protocol-faithful fake QMP server fleet with fault injection. It is
not re-exported here so that ``python -m migpredictd.testing.fakeqmp`` runs without a double import.
"""
