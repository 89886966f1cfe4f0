"""The README and docs/*.md: every relative markdown link resolves, to a file or folder
of this repository and, where it has a ``#anchor`` into a markdown file, to a heading
of that file (GitHub's slugs); absolute links (http, https, mailto, ...) are not
fetched.  The README stays short (under 10 KB: the rest belongs in docs/).
Standard library only."""

from __future__ import annotations

import glob
import os
import re
from urllib.parse import unquote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_LIMIT = 10_000  # bytes

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[`~]*[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]*)>?(?:\s+[\"'(][^)]*)?\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def doc_files(root: str = ROOT) -> list[str]:
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def _prose(text: str) -> str:
    """The text without fenced code blocks (kept as blank lines) and code spans."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return CODE_SPAN.sub(lambda m: " " * len(m.group(0)) if "\n" not in m.group(0) else m.group(0), text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: the rendered text (code spans' contents,
    link texts) lower-cased, punctuation other than ``-`` and ``_`` dropped, spaces
    to ``-``."""
    text = re.sub(r"`+([^`]*)`+", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]*>", "", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    """Every heading anchor of a markdown file, duplicates numbered as GitHub does."""
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(text):
        s = slug(m.group(2))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [m.group(1) for m in LINK.finditer(_prose(f.read()))]


def broken_links(path: str, root: str = ROOT) -> list[str]:
    """What is wrong with the links of one markdown file: one line per bad link."""
    problems = []
    here = os.path.dirname(path)
    for target in links(path):
        if not target:
            problems.append(f"{path}: empty link target")
            continue
        if SCHEME.match(target):  # http(s), mailto, ...: not fetched
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(here, unquote(file_part))) if file_part else path
        if os.path.commonpath([os.path.abspath(dest), os.path.abspath(root)]) != os.path.abspath(root):
            problems.append(f"{path}: {target}: outside the repository")
        elif not os.path.exists(dest):
            problems.append(f"{path}: {target}: no such file")
        elif anchor:
            if not dest.endswith(".md"):
                problems.append(f"{path}: {target}: an anchor into a file that is not markdown")
            elif unquote(anchor).lower() not in anchors(dest):
                problems.append(f"{path}: {target}: no heading #{anchor} in {os.path.relpath(dest, root)}")
    return problems


# ------------------------------------------------------------------ the repository's pages


def test_every_relative_link_resolves():
    files = doc_files()
    assert len(files) > 1, "docs/*.md missing"
    problems = [p for f in files for p in broken_links(f)]
    assert not problems, "\n".join(problems)


def test_docs_link_to_each_other():
    """The README links every docs page (and bench/RESULTS.md): none is orphaned."""
    targets = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0]))
               for t in links(os.path.join(ROOT, "README.md")) if not SCHEME.match(t)}
    for page in doc_files()[1:] + [os.path.join(ROOT, "bench", "RESULTS.md")]:
        assert page in targets, f"README.md does not link {os.path.relpath(page, ROOT)}"


def test_readme_is_short():
    size = os.path.getsize(os.path.join(ROOT, "README.md"))
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT}, move the rest into docs/"


PATH_SPAN = re.compile(r"`((?:converters|reference|tests|scripts|bench|demo|docs)/[\w./-]*)`")


def test_named_repository_paths_exist():
    """Every repository path the pages name in a code span (`converters/io/files.py`,
    `demo/chain/`) exists: the pages follow the layout as it changes.  Patterns
    (`{...}`, `<model>`, `*`) and generated folders are not paths."""
    generated = ("build/", "bench-cache", "bench-results")
    missing = []
    for path in doc_files():
        with open(path, encoding="utf-8") as f:
            text = FENCE.sub("", f.read())
        for name in PATH_SPAN.findall(text):
            if not name.startswith(generated) and not os.path.exists(os.path.join(ROOT, name)):
                missing.append(f"{os.path.relpath(path, ROOT)}: {name}")
    assert not missing, "\n".join(missing)


def test_no_placeholder_urls():
    for path in doc_files() + [os.path.join(ROOT, "docs", "runtime-ci.yml")]:
        with open(path, encoding="utf-8") as f:
            assert "github.com/OWNER" not in f.read(), path


# ------------------------------------------------------------------ the checker itself


def test_slugs_are_githubs():
    assert slug("Two releases, 2.0 and 2.5") == "two-releases-20-and-25"
    assert slug("`__metadata__`") == "__metadata__"
    assert slug("`--profile indextts2`") == "--profile-indextts2"
    assert slug("What the tool refuses, and why") == "what-the-tool-refuses-and-why"
    assert slug("Bulk load onto CUDA (issue 18), 2026-11-27") == "bulk-load-onto-cuda-issue-18-2026-11-27"
    assert slug("IndexTTS-2.5 at full size (issue 14), 2026-11-27") == "indextts-25-at-full-size-issue-14-2026-11-27"


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "other.md").write_text("# Other\n\n## A section, twice\n\n## A section, twice\n\n```sh\n# not a heading\n```\n")
    (tmp_path / "data.json").write_text("{}")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](../other.md) [ok](../other.md#a-section-twice) [ok](../other.md#a-section-twice-1) [ok](#page)\n"
        "[ok](../data.json) [ok](https://example.invalid/missing) [ok](mailto:a@example.invalid) ![ok](../data.json)\n"
        "[gone](../missing.md)\n"
        "[no anchor](../other.md#no-such-section)\n"
        "[not a heading](../other.md#not-a-heading)\n"
        "[own anchor](#nowhere)\n"
        "[json anchor](../data.json#key)\n"
        "[escape](../../outside.md)\n"
        "`[in code](nowhere.md)`\n\n"
        "```\n[in a block](nowhere.md)\n```\n")
    problems = broken_links(str(page), root=str(tmp_path))
    got = sorted(p.split(": ")[1] for p in problems)
    assert got == sorted(["../missing.md", "../other.md#no-such-section", "../other.md#not-a-heading", "#nowhere",
                          "../data.json#key", "../../outside.md"]), problems
