"""The Markdown pages (README.md and docs/*.md): every relative link resolves to a file, and its `#anchor` to a heading
there (GitHub's slugs); no line over 120 characters outside tables and fenced code; the README at most 250 lines.
Pure Python: no Ray, no torch."""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PAGES = sorted(["README.md"] + [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))])
MAX_LINE = 120
LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def _read(page: str) -> list[str]:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read().splitlines()


def _prose(lines: list[str]):
    """(line number, line) for every line outside fenced code blocks."""
    fence = None
    for n, line in enumerate(lines, 1):
        stripped = line.lstrip()
        marker = re.match(r"(`{3,}|~{3,})", stripped)
        if fence is None and marker:
            fence = marker.group(1)
            continue
        if fence is not None:
            if stripped.startswith(fence) and not stripped[len(fence):].strip():
                fence = None
            continue
        yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: inline markup dropped, lower case, punctuation removed (letters, digits,
    `_`, `-` and spaces stay), spaces become `-`.

    >>> slug("Preparing data: `bench/prepare.py`")
    'preparing-data-benchpreparepy'
    >>> slug("The GPU part — not measured (issue 24)")
    'the-gpu-part--not-measured-issue-24'
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: str) -> set[str]:
    """Every heading's anchor on a page, a repeated one numbered as GitHub numbers it (`-1`, `-2`, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose(_read(page)):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: str):
    """(line number, target) for every relative link outside code."""
    for n, line in _prose(_read(page)):
        for m in LINK.finditer(CODE_SPAN.sub("", line)):
            target = m.group(2)
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            yield n, target


def test_the_pages_are_found():
    assert "README.md" in PAGES and "docs/DESIGN.md" in PAGES and len(PAGES) >= 8


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves_to_a_file_and_a_heading(page):
    broken = []
    for n, target in links(page):
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, dest)):
            broken.append(f"{page}:{n}: {target}: no file {dest}")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"{page}:{n}: {target}: no heading #{anchor} in {dest}")
    assert broken == []


@pytest.mark.parametrize("page", PAGES)
def test_no_line_over_120_characters_outside_tables_and_code(page):
    long = [f"{page}:{n}: {len(line)} characters" for n, line in _prose(_read(page))
            if len(line) > MAX_LINE and not line.lstrip().startswith("|")]
    assert long == []


def test_the_readme_is_at_most_250_lines():
    assert len(_read("README.md")) <= 250


def test_slugs_follow_github():
    assert slug("Set up and run") == "set-up-and-run"
    assert slug("Running on a cluster") == "running-on-a-cluster"
    assert slug("`train.backend`: which one") == "trainbackend-which-one"
    assert slug("Résumé, café") == "résumé-café"
