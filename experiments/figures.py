"""Regenerates every figure and table of the README and docs/ into docs/figures.

    python experiments/figures.py [--quick] [--parts ...] [--repeats N]

The benchmark suite (experiments/bench.py --figures: bench_suite.csv,
bench_<part>.png) and then every producer in `lca.bench.figures.PRODUCERS`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402

if __name__ == "__main__":
    bench.main(figures=True)
