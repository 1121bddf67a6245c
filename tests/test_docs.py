"""The README and docs/: a landing page within 250 lines, relative links that reach a file and heading, examples
that run, and the test command .ci/run reads."""

import os
import re
import subprocess
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
MAX_README_LINES = 250
FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target) and ![alt](target); the target ends at whitespace (a title may follow) or the closing parenthesis.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def markdown_files() -> list[str]:
    return [README] + sorted(os.path.join(DOCS, name) for name in os.listdir(DOCS) if name.endswith(".md"))


def prose_lines(path: str) -> list[tuple[int, str]]:
    """The numbered lines of a markdown file outside fenced code blocks."""
    lines, fenced = [], False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if FENCE.match(line):
                fenced = not fenced
            elif not fenced:
                lines.append((number, line.rstrip("\n")))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, markup and punctuation dropped (``-`` and ``_`` kept), spaces to
    hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = "".join(c for c in text.lower() if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: str) -> list[tuple[int, str]]:
    inline_code = re.compile(r"`[^`]*`")
    return [
        (number, target)
        for number, line in prose_lines(path)
        for target in LINK.findall(inline_code.sub("", line))
    ]


def test_every_relative_link_reaches_a_file_and_its_heading():
    broken, checked = [], 0
    for path in markdown_files():
        for number, target in links(path):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...: not this repository's
                continue
            checked += 1
            file_part, _, fragment = target.partition("#")
            linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            where = f"{os.path.relpath(path, ROOT)}:{number}: {target}"
            if not os.path.exists(linked):
                broken.append(f"{where} (no such file)")
            elif fragment and linked.endswith(".md") and fragment not in anchors(linked):
                broken.append(f"{where} (no such heading in {os.path.relpath(linked, ROOT)})")
    assert not broken, "\n".join(broken)
    assert checked > 40  # the README's tables and the docs' cross-references were all read


def test_the_link_checker_finds_what_is_broken(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A `title`, with punctuation!\n\n[ok](#a-title-with-punctuation) [bad](#nope) "
                    "[gone](missing.md) `[code](skipped.md)`\n```\n[fenced](skipped.md)\n```\n")
    assert anchors(str(page)) == {"a-title-with-punctuation"}
    assert [target for _, target in links(str(page))] == ["#a-title-with-punctuation", "#nope", "missing.md"]


def test_the_readme_is_a_landing_page():
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    bash_blocks = re.findall(r"```bash\n(.*?)```", "\n".join(lines), re.S)
    install, test = bash_blocks[0].strip(), bash_blocks[1].strip()
    assert install.startswith("python3 -m venv .venv") and install.endswith("&& fastvae train")
    # .ci/run runs the line its grep finds: the marker, the fence, then the command.
    command = subprocess.run(
        "grep -A2 '<!-- test-command' README.md | sed -n 3p", shell=True, cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert command == test and command.endswith("python -m pytest -q tests") and "pip install -e" in command
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert "grep -A2 '<!-- test-command' README.md | sed -n 3p" in f.read()


def python_examples() -> list[tuple[str, int, str]]:
    """The ``python`` blocks of the README and docs that run on their own in a second: every one that defines its
    inputs, trains nothing (a call of ``train(`` runs a whole training run) and reads no run folder."""
    examples = []
    for path in markdown_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for match in re.finditer(r"```python\n(.*?)```", text, re.S):
            code = match.group(1)
            if "import" in code and "train(" not in code and "runs/" not in code:
                examples.append((os.path.relpath(path, ROOT), text[: match.start()].count("\n") + 1, code))
    return examples


@pytest.mark.parametrize("where, line, code", python_examples(), ids=lambda v: str(v)[:40])
def test_the_python_examples_run(where, line, code):
    exec(compile(code, f"{where}:{line}", "exec"), {})
