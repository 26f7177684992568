"""Regenerates every figure and result table of the README and docs/.

    python experiments/figures.py [--quick] [--parts ...] [--repeats N]
    python experiments/figures.py --tables     # only rewrite the tables from docs/figures

Every benchmark part (experiments/bench.py --figures: the suite, the ring's
balance, training; bench_*.csv and bench_<part>.png), then every producer in
`lca.bench.figures.PRODUCERS` (cost model figures, layout diagram), all into
docs/figures; then every table between `<!-- table:NAME -->` markers in
README.md and docs/*.md is rewritten from those files (`tools/tables.py`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402

if __name__ == "__main__":
    bench.main(figures=True)
