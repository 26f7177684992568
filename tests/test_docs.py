"""The README and docs match the repository: links resolve, named scripts and targets exist."""

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SCRIPT = re.compile(r"(?:^|[\s`(])(?:\.venv/bin/)?python3? (?:-m \S+ )?([\w./-]+\.py)\b")
MAKE = re.compile(r"(?:^|[\s`])make ([a-z][\w-]*)")


def _text(path):
    with open(path) as f:
        return f.read()


def slug(heading):
    """GitHub's anchor for a Markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def anchors(path):
    text = re.sub(r"```.*?```", "", _text(path), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("path", DOCS, ids=os.path.basename)
def test_every_relative_link_and_anchor_resolves(path):
    bad = []
    for target in LINK.findall(_text(path)):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(full):
            bad.append(f"{target}: no file {os.path.relpath(full, REPO)}")
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            bad.append(f"{target}: no section #{anchor} in {os.path.relpath(full, REPO)}")
    assert not bad, f"{os.path.relpath(path, REPO)}: " + "; ".join(bad)


@pytest.mark.parametrize("path", DOCS, ids=os.path.basename)
def test_every_script_and_make_target_named_exists(path):
    text = _text(path)
    with open(os.path.join(REPO, "Makefile")) as f:
        targets = set(re.findall(r"^([a-z][\w-]*):", f.read(), flags=re.M))
    missing = [s for s in SCRIPT.findall(text) if not os.path.exists(os.path.join(REPO, s))]
    missing += [f"make {t}" for t in MAKE.findall(text) if t not in targets]
    assert not missing, f"{os.path.relpath(path, REPO)} names what does not exist: {missing}"
