"""Benchmark harness for pykernels' FP8 GEMMs (run with ``python -m bench``).

Kept importable without a GPU so the CPU tests can check shapes, counts and reports.
"""
