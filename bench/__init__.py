"""``make bench``: full-size synthetic inputs in the release layout, and measurements
of conversion speed, converter memory, ``check`` speed and runtime load speed.

    python -m bench.run --cache ./bench-cache     (or: make bench BENCH_CACHE=...)

:mod:`bench.inputs` generates the inputs, :mod:`bench.run` measures.  Not a timed test:
CI does not run it; ``tests/test_bench.py`` runs the machinery on tiny inputs.
"""
