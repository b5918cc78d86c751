"""The lab: real QEMU guests (the rig), the fake QMP server, the seed's reference algorithm and the demo.

Tests, benchmarks and `migpredictd demo` use it. The daemon's runtime path never imports it
(`tests/test_layout.py` checks that).
"""
