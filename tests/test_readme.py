"""The README's Quickstart stays true: CI runs its test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [
        line for block in blocks for line in block.splitlines() if line and not line.startswith("#")
    ]


def test_quickstart_has_exactly_two_commands() -> None:
    commands = quickstart_commands()
    assert len(commands) == 2
    assert "pytest" in commands[0]
    assert "maskteacher" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert quickstart_commands()[0] in ci


def test_readme_config_reference_is_current() -> None:
    from maskteacher.config import REFERENCE_BEGIN, REFERENCE_END, reference_markdown

    text = (REPO / "README.md").read_text()
    block = text.split(REFERENCE_BEGIN, 1)[1].split(REFERENCE_END, 1)[0]
    assert block.strip() == reference_markdown().strip(), (
        "README config reference is stale: run `maskteacher config reference --update README.md`"
    )
