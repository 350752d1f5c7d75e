"""The docs site's home page is the README's answer and overview with its links made relative to docs/:
`python -m tests.docs_index` writes docs/index.md, and tests/test_readme_links.py checks it is current, so the two
cannot drift apart."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("Does a mixture beat one LoRA?", "What is inside")
START_HERE = """## Start here

- [Installation](get-started/installation.md): CPU, GPU, extras, versions.
- [Quick start](get-started/quickstart.md): a mixture on the bundled model in Python, the PEFT names, the command
  line, and what the bundled run prints.
- [Run an ablation](guides/ablation.md): the comparison that says whether a mixture is worth it on your domains.
"""


def section(readme: str, title: str) -> str:
    start = readme.index(f"## {title}")
    end = readme.find("\n## ", start + 3)
    return readme[start : end if end > 0 else len(readme)].rstrip() + "\n"


def relink(markdown: str) -> str:
    """README links as the site sees them: docs/x -> x; a file outside docs/ is named, not linked."""

    def one(match: re.Match) -> str:
        label, target = match.group(1), match.group(2)
        if re.match(r"[a-z]+:|#", target):
            return match.group(0)
        if target.startswith("docs/"):
            return f"[{label}]({target.removeprefix('docs/')})"
        return label if label.startswith("`") else f"{label} (`{target}`)"

    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", one, markdown)


def index_page(readme: str) -> str:
    intro = readme[: readme.index("## ")]
    parts = [relink(intro + section(readme, SECTIONS[0])), START_HERE, relink(section(readme, SECTIONS[1]))]
    return "\n".join(parts)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "index.md"
    target.write_text(index_page((REPO / "README.md").read_text()))
