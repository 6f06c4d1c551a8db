"""The README is a front page and docs/ holds the reference: every relative link in README.md and docs/*.md
reaches an existing file (and heading, for a link with an anchor), every docs page is linked from the README, and
the README stays short enough to read in two minutes."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def links(page: Path) -> list[str]:
    """The link targets of ``page``, outside code blocks and code spans."""
    text = CODE.sub("", FENCE.sub("", page.read_text()))
    return LINK.findall(text)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_heading(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if ROOT in file.parents else file}")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_links_are_relative_or_web():
    for page in PAGES:
        for target in links(page):
            assert not target.startswith("/"), f"{page.name}: absolute path {target}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160, "the README is the front page: move reference sections to docs/"
    assert "make repro" in text and "make test" in text  # the two commands; .ci/run calls `make test`
    assert "make test" in (ROOT / ".ci/run").read_text()
    for heading in ("## What we found", "## Profiles", "## One run by hand", "## Where things are"):
        assert f"\n{heading}\n" in text, heading


def test_the_slug_rule():
    assert slug("Divergence (the one statement of the rule)") == "divergence-the-one-statement-of-the-rule"
    assert slug("Output width 1 and float32's resolution (Table V, Fig. 6)") == \
        "output-width-1-and-float32s-resolution-table-v-fig-6"
    assert slug("`make test`") == "make-test"
