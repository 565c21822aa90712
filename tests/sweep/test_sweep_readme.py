"""The README's sweep commands parse: options exist, variants and grids expand, slices are valid."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from maskteacher.cli import build_parser
from maskteacher.sweep.grid import expand, parse_grid, parse_seeds, parse_variants

README = Path(__file__).resolve().parents[2] / "README.md"


def sweep_commands() -> list[list[str]]:
    text = README.read_text()
    section = text.split("## Repeated fine-tuning", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("sbatch"):  # the command inside --wrap '...'
                line = shlex.split(line)[-1]
            if line.startswith("maskteacher sweep"):
                line = line.replace('"$SLURM_ARRAY_TASK_ID"', "3").replace(
                    '"$SLURM_ARRAY_TASK_COUNT"', "9"
                )
                commands.append(shlex.split(line)[1:])
    return commands


def test_readme_sweep_commands_parse_and_expand():
    commands = sweep_commands()
    assert len(commands) >= 4
    assert any("--index" in c for c in commands) and any(c[1] == "collect" for c in commands)
    for argv in commands:
        args = build_parser().parse_args(argv)
        assert args.command == "sweep"
        if args.config == "collect":
            continue
        combos = expand(parse_variants(args.variant), parse_grid(args.grid))
        assert combos and parse_seeds(args.seeds) and args.out
