"""Performance harness of smn (not timed tests): ``python -m benchmarks.run_all --out DIR``.

Every figure is set against a floor (what a perfect implementation would cost, measured at the same
shapes in the same run) or a variant measured side by side in the same run, interleaved; absolute
times on a shared machine drift, ratios measured together do much less.
"""
