"""The pure core: typed functions and frozen data, no I/O, no clocks, no threads.

Units, QMP addresses, the canonical measurement, the memory model, the predictor, the calibrated
constants, table rendering and the error tree. Modules here import only the standard library, numpy and
each other (`tests/test_layout.py` keeps it so).
"""
