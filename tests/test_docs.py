"""The README documents every option `--help` offers (docs that match the command line)."""

from __future__ import annotations

from pathlib import Path

import typer

from clipn_cli.cli.app import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_every_option_of_every_command_is_in_the_readme() -> None:
    root = typer.main.get_command(app)
    missing = []
    for name, command in root.commands.items():
        for sub_name, sub in (command.commands.items() if hasattr(command, "commands") else [(None, command)]):
            assert f"clipn {name}" in README, name
            missing += [(name, sub_name, opt) for param in sub.params for opt in param.opts
                        if opt.startswith("--") and opt != "--help" and f"`{opt}" not in README and f"{opt} " not in README and f"{opt}," not in README]
    assert not missing
