"""The README and docs/: the test command is the one .ci/run runs, the README stays short, links lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

from anomalib_mvfa.commands import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def bash_blocks(text: str) -> list[str]:
    """The ```bash blocks of a Markdown text."""
    return re.findall(r"^```bash\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def test_readme_test_command_is_what_ci_runs() -> None:
    commands = [block.strip() for block in bash_blocks(README.read_text()) if "pytest" in block]
    assert len(commands) == 1, f"the README should give one test command, found {commands}"
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[0] in ci_lines, f".ci/run does not run the README's test command {commands[0]!r}"


def test_readme_main_command_installs_and_runs_a_command_that_exists() -> None:
    first = bash_blocks(README.read_text())[0].strip()
    match = re.fullmatch(
        r"python -m venv \.venv && \.venv/bin/pip install -e \. && \.venv/bin/anomalib-mvfa (\w+)", first
    )
    assert match, f"the README's first command does not install the package and run anomalib-mvfa: {first!r}"
    assert match.group(1) in COMMANDS


def test_readme_is_at_most_15_kb() -> None:
    size = len(README.read_bytes())
    assert size <= 15_000, f"README.md is {size} bytes; move details to docs/pages/"


def test_readme_relative_links_exist() -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [target for target in targets if "://" not in target]
    assert local, "the README links to no page of docs/"
    missing = [target for target in local if not (ROOT / target).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_every_docs_page_is_in_the_navigation() -> None:
    config = (ROOT / "docs" / "mkdocs.yml").read_text()
    pages = sorted(
        path.relative_to(ROOT / "docs" / "pages").as_posix() for path in (ROOT / "docs" / "pages").rglob("*.md")
    )
    missing = [
        page for page in pages if not re.search(rf"^\s*-\s*(?:[^:\n]+:\s*)?{re.escape(page)}\s*$", config, re.MULTILINE)
    ]
    assert not missing, f"docs/mkdocs.yml's nav lacks {missing}"
