"""The docs cannot drift from the code: every relative link in README.md and docs/*.md resolves
(its #anchor to a heading of the page), every path of this repository they name exists, and every
`edgellm ...` command line they show parses with the CLI's own parser (no --help, nothing run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w/.~$:-])((?:docs|benchmarks|edgellm|tests)/[\w./-]*[\w/])")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = re.sub(r"[`*_\[\]()]|\]\([^)]*\)", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", _prose(page.read_text()),
                                                  re.M)}


def _prose(text: str) -> str:
    """The page without its fenced code blocks (a `# comment` there is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def broken_links(page: Path, text: str) -> list[str]:
    bad = []
    for target in LINK.findall(_prose(text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            bad.append(f"{target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            bad.append(f"{target}: no heading #{anchor} in {where.name}")
    return bad


def missing_paths(text: str) -> list[str]:
    return sorted({p for p in REPO_PATH.findall(text) if not (ROOT / p.rstrip(".")).exists()})


def ragged_tables(text: str) -> list[str]:
    """Table rows whose cell count is not their header's (such a table is not drawn as one)."""
    def cells(line: str) -> int:
        return len(re.findall(r"(?<!\\)\|", INLINE.sub("code", line)))

    bad, lines = [], _prose(text).splitlines()
    for i, line in enumerate(lines[1:], 1):
        if re.fullmatch(r"\|(\s*:?-+:?\s*\|)+\s*", line) and lines[i - 1].startswith("|"):
            header = cells(lines[i - 1])
            rows = [lines[i]]
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    break
                rows.append(row)
            bad += [row for row in rows if cells(row) != header]
    return bad


def command_lines(text: str) -> tuple[list[str], list[str]]:
    """`edgellm COMMAND ...` as the page shows it: whole command lines (code blocks, indented or
    fenced; cut at a pipe), and mentions in inline code that start with a command's name (`edgellm
    run --json-schema FILE`: a command and some of its options, its arguments left out)."""
    from edgellm.cli import parser

    commands = set(parser().commands)
    lines, mentions, fenced = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        code = line.strip().removeprefix("$ ").split(" | ")[0]
        if (fenced or line.startswith("    ")) and code.startswith("edgellm "):
            lines.append(code)
    for span in INLINE.findall(text):
        words = span.split()
        if len(words) > 1 and words[0] == "edgellm" and words[1] in commands:
            mentions.append(span.split(" | ")[0])
    return lines, mentions


def parse_error(line: str) -> str | None:
    """Why a whole command line does not parse (None: it does)."""
    import contextlib
    import io

    from edgellm.cli import _parse

    words = shlex.split(line, comments=True)[1:]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _parse(words)
    except SystemExit as e:
        return err.getvalue().strip().splitlines()[-1] if e.code else None  # --help: 0
    return None


def unknown_options(mention: str) -> list[str]:
    """The options a mention of a command names that the command does not have."""
    from edgellm.cli import parser

    words = shlex.split(mention, comments=True)
    known = {o for a in parser().commands[words[1]]._actions for o in a.option_strings}
    return [w for w in words[2:] if w.startswith("-") and w.split("=")[0] not in known]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    assert broken_links(page, page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_paths_exist(page):
    assert missing_paths(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_tables_are_whole(page):
    assert ragged_tables(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_command_lines_parse(page):
    lines, mentions = command_lines(page.read_text())
    bad = {line: parse_error(line) for line in lines}
    assert {line: why for line, why in bad.items() if why} == {}
    bad = {mention: unknown_options(mention) for mention in mentions}
    assert {mention: what for mention, what in bad.items() if what} == {}


def test_readme_has_the_two_commands_and_every_task_on_its_first_screens():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert "    pip install -e . && edgellm demo" in readme and "    bash .ci/run " in readme
    tour = readme.split("## What it reaches")[0]
    for task in ("edgellm chat", "edgellm serve", "edgellm build", "edgellm plan",
                 "compare_llamacpp.py"):
        assert task in tour, task


def test_the_checks_catch_what_they_are_for(tmp_path):
    """Each check fails on the mistake it exists for."""
    page = tmp_path / "page.md"
    text = ("# Title\n\nSee [a](missing.md), [b](page.md#title), [c](page.md#nope) and "
            "`docs/NOPE.md`.\n\n    edgellm serve ART --no-such-flag\n"
            "    edgellm plan ART --board rpi9\n    edgellm run ART --prompt hi\n\n"
            "Inline: `edgellm bench --kernels auto`, `edgellm run --json-schema FILE`.\n")
    page.write_text(text)
    assert broken_links(page, text) == ["missing.md: no such file",
                                        "page.md#nope: no heading #nope in page.md"]
    assert missing_paths(text) == ["docs/NOPE.md"]
    lines, mentions = command_lines(text)
    errors = {line: parse_error(line) for line in lines}
    assert "unrecognized arguments: --no-such-flag" in errors["edgellm serve ART --no-such-flag"]
    assert "invalid choice: 'rpi9'" in errors["edgellm plan ART --board rpi9"]
    assert errors["edgellm run ART --prompt hi"] is None
    assert [unknown_options(m) for m in mentions] == [["--kernels"], []]
    table = "| a | b |\n|---|---|\n| 1 | `x|y` |\n| 1 | 2 | 3 |\n"
    assert ragged_tables(table) == ["| 1 | 2 | 3 |"]
    assert slug("The path of 8-bit weights (`--kernel`)") == "the-path-of-8-bit-weights---kernel"
    assert slug("A smart home's prompt") == "a-smart-homes-prompt"
