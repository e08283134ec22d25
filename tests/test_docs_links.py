"""Every relative link in the Markdown documentation resolves to a file (and heading)."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", REPO / "benchmarks" / "README.md", REPO / "recipes" / "README.md",
                *(REPO / "docs").glob("*.md")])
# Pages announced by the README that other branches are writing; remove an entry
# when its page is merged.
PENDING = set()  # pages linked before they are written
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading):
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page):
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", page.read_text(encoding="utf-8"), re.M)}


def relative_links(page):
    text = re.sub(r"^    .*$", "", page.read_text(encoding="utf-8"), flags=re.M)  # code blocks
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        name = dest.relative_to(REPO).as_posix() if dest.is_relative_to(REPO) else str(dest)
        if name in PENDING:
            continue
        if not dest.exists():
            broken.append(target)
        elif anchor and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Title\n[a](missing.md) [b](#title) [c](https://x.org/y)\n    [d](in_code.md)\n")
    assert relative_links(page) == ["missing.md", "#title"]
    assert slug("Distilled-corpus speed") == "distilled-corpus-speed"
    assert slug("`a2d` step cost") == "a2d-step-cost"
