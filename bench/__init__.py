"""Load tests and micro-benchmarks of the running stack (`eco2 bench ...`; see docs/benchmarks.md).

Not part of `make test`: runs take minutes. tests/test_bench_smoke.py runs each one tiny so the
harness cannot rot.
"""
