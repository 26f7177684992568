"""The README's and docs/' result tables, rewritten from the data files in docs/figures.

    python experiments/figures.py            # measure everything, then rewrite the tables
    python experiments/figures.py --tables   # rewrite the tables from the data already there

A table lives in a Markdown file between two comments,

    <!-- table:single -->
    ...rewritten...
    <!-- /table:single -->

and `TABLES[name](data)` (`tools/results.py`) renders it from the data. No
number in these tables is typed by hand; a table whose data is missing is
left as it was, and the update says so.
"""

from __future__ import annotations

import glob
import os
import re

import results
from results import (balance, linear, memory_check, mesh, overlap, questions, single,
                     step_time, strategy, train)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES_DIR = os.path.join(REPO, "docs", "figures")
MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)",
                    re.S)
TABLES = {"questions": questions, "single": single, "mesh": mesh, "linear": linear,
          "balance": balance, "memory-check": memory_check, "overlap": overlap,
          "step-time": step_time, "strategy": strategy, "train": train}


# ----------------------------------------------------------------------------- files


def update_text(text, tables, where="text"):
    """(new text, names rewritten, names kept because their data is missing)."""
    written, kept = [], []

    def replace(m):
        name = m["name"]
        if name not in tables:
            raise KeyError(f"{where}: unknown table {name!r}; tables: {sorted(tables)}")
        if tables[name] is None:
            kept.append(name)
            return m[0]
        written.append(name)
        return m[1] + tables[name].rstrip("\n") + "\n" + m[4]

    return MARKER.sub(replace, text), written, kept


def markdown_files(root=REPO):
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def render(figures_dir):
    data = results.load(figures_dir)
    return {name: fn(data) for name, fn in TABLES.items()}


def update_docs(figures_dir, files=None):
    """Rewrites every marked table in README.md and docs/*.md; returns one line per file."""
    tables = render(figures_dir)
    notes = []
    for path in files or markdown_files():
        with open(path) as f:
            text = f.read()
        new, written, kept = update_text(text, tables, where=path)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
        if written or kept:
            notes.append(f"{os.path.relpath(path, REPO)}: rewrote {', '.join(written) or 'none'}"
                         + (f"; kept (no data): {', '.join(kept)}" if kept else ""))
    return notes
