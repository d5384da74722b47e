"""tpfx benchmarks: step time against hand-written and DTensor tensor parallelism, traffic, pass cost.

Run ``python -m benchmarks --quick`` (under 3 minutes on 2 cores) or ``python -m benchmarks``.
"""
