"""Regenerates every figure and result table of the README and docs/.

    python experiments/figures.py [--quick] [--parts ...] [--repeats N]
    python experiments/figures.py --tables     # only rewrite the tables from docs/figures

The benchmark suite (experiments/bench.py --figures: bench_suite.csv,
bench_<part>.png), then every producer in `lca.bench.figures.PRODUCERS`
(cost model, layout diagram, cost-model validation, training benchmark),
all into docs/figures; then every table between `<!-- table:NAME -->`
markers in README.md and docs/*.md is rewritten from those files
(`lca.bench.tables`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402

if __name__ == "__main__":
    bench.main(figures=True)
