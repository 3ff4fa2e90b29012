"""Every relative link and image in README.md and docs/*.md points at a file that exists (and, for
``file.md#anchor`` or ``#anchor``, at a heading of that file, slugged as GitHub does)."""
import glob
import os
import re
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit

import markdown
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


class _Links(HTMLParser):
    """Link targets (a href, img src) and heading texts of a rendered markdown page."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.headings: list[str] = []
        self._heading: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "a" and attr.get("href"):
            self.targets.append(attr["href"])
        elif tag == "img" and attr.get("src"):
            self.targets.append(attr["src"])
        elif re.fullmatch(r"h[1-6]", tag):
            self._heading = []

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._heading.append(data)

    def handle_endtag(self, tag: str) -> None:
        if re.fullmatch(r"h[1-6]", tag) and self._heading is not None:
            self.headings.append("".join(self._heading))
            self._heading = None


def _parse(path: str) -> _Links:
    with open(path, encoding="utf-8") as fh:
        html = markdown.markdown(fh.read(), extensions=["fenced_code", "tables"])
    links = _Links()
    links.feed(html)
    return links


def _anchors(path: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation and symbols dropped, spaces to hyphens, -1, -2 for repeats."""
    seen: dict[str, int] = {}
    for text in _parse(path).headings:
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
    return {slug if n == 0 else f"{slug}-{n}" for slug, count in seen.items() for n in range(count + 1)}


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    broken = []
    for target in _parse(path).targets:
        parts = urlsplit(target)
        if parts.scheme or parts.netloc:
            continue
        file = os.path.normpath(os.path.join(os.path.dirname(path), unquote(parts.path))) if parts.path else path
        if not os.path.exists(file):
            broken.append(f"{target} (no file {os.path.relpath(file, ROOT)})")
        elif parts.fragment and file.endswith(".md") and parts.fragment not in _anchors(file):
            broken.append(f"{target} (no heading #{parts.fragment} in {os.path.relpath(file, ROOT)})")
    assert not broken, f"{os.path.relpath(path, ROOT)}: broken links: {broken}"


def test_every_file_under_docs_is_linked():
    """Figures, tables and pages under docs/ are each linked from README.md or a page under docs/ (the top-level
    pages are the exception: the link test above reads them); a file nothing links to is an orphan."""
    pages = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)]
    linked = set()
    for page in pages:
        for target in _parse(page).targets:
            parts = urlsplit(target)
            if not (parts.scheme or parts.netloc) and parts.path:
                file = os.path.normpath(os.path.join(os.path.dirname(page), unquote(parts.path)))
                if file != os.path.normpath(page):
                    linked.add(file)
    files = [os.path.normpath(f) for f in glob.glob(os.path.join(ROOT, "docs", "**", "*"), recursive=True)
             if os.path.isfile(f)]
    orphans = sorted(os.path.relpath(f, ROOT) for f in files if f not in linked and f not in DOCUMENTS)
    assert not orphans, f"files under docs/ that no page links to (link them or delete them): {orphans}"
