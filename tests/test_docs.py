"""The README and docs/ pages: the generated options page is current, every relative link resolves."""

from __future__ import annotations

import glob
import os
import re

from pipelines.run import options_doc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are code, not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not - and _), spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings, with GitHub's -1, -2 ... for repeated ones."""
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*#*$", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S), re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_the_options_page_is_the_generated_one():
    with open(os.path.join(REPO, "docs", "options.md"), encoding="utf-8") as handle:
        assert handle.read() == options_doc.page(), \
            "docs/options.md is stale: run python -m pipelines.run.options_doc > docs/options.md"


def test_the_slugs_follow_githubs_rules():
    assert slug("Check before you launch: `--validate_only`") == "check-before-you-launch---validate_only"
    assert slug("Adaptive samples (`samples: auto`)") == "adaptive-samples-samples-auto"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_every_relative_link_and_image_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(_prose(_read(page))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            where = f"{os.path.relpath(page, REPO)}: {target}"
            if not os.path.exists(resolved):
                broken.append(f"{where} (no file {os.path.relpath(resolved, REPO)})")
            elif anchor and resolved.endswith(".md") and anchor not in anchors(_read(resolved)):
                broken.append(f"{where} (no heading with that anchor)")
    assert len(PAGES) >= 10
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_front_page():
    assert len(_read(PAGES[0]).splitlines()) <= 250
