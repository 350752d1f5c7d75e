"""The README is read on GitHub and PyPI, outside the docs site that `mkdocs build --strict` checks in CI: every
relative link in it must name a file of the repository, and every #anchor a heading of the page it points at."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]+\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def anchors(markdown: str) -> set[str]:
    """GitHub's and MkDocs' slugs of the headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken(page: Path) -> list[str]:
    problems = []
    for target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            problems.append(f"{target}: no such heading")
    return problems


@pytest.mark.parametrize("page", ["README.md", "examples/README.md", "configs/README.md", "CHANGELOG.md"])
def test_every_relative_link_names_a_file_and_a_heading_that_exist(page):
    assert broken(REPO / page) == []


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[a](there.md) [b](missing.md) [c](there.md#a-heading) [d](there.md#nowhere) [e](https://x.org)")
    assert broken(page) == ["missing.md: no such file", "there.md#nowhere: no such heading"]


def test_the_docs_home_page_is_the_readmes_answer_as_written_by_its_generator():
    from tests.docs_index import index_page

    current = (REPO / "docs" / "index.md").read_text()
    assert current == index_page((REPO / "README.md").read_text()), "python -m tests.docs_index rewrites it"
