"""The documentation says what the code does."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    from fedfs.cli.doc import render

    assert (ROOT / "docs" / "cli.md").read_text() == render(), \
        "docs/cli.md is stale: run `python -m fedfs.cli.doc > docs/cli.md`"


def test_every_command_the_issue_names_exists():
    from fedfs.cli import main

    names = set(main.commands)
    for cmd in ("init", "keygen", "doctor", "site", "aggregator", "status", "report", "export", "simulate",
                "demo", "bundle"):
        assert cmd in names, cmd
    assert set(main.commands["site"].commands) >= {"fingerprint", "plan", "run", "step"}
    assert set(main.commands["aggregator"].commands) >= {"run", "step"}


def test_docs_and_examples_exist():
    for name in ("index", "concepts", "protocol", "security", "privacy", "operations", "cli", "api", "benchmarks"):
        assert (ROOT / "docs" / f"{name}.md").stat().st_size > 500, name
    for name in ("local_simulation.sh", "plain_pytorch.py", "scripted_rounds.py", "cron/fedfs.cron",
                 "systemd/fedfs-site.service", "systemd/fedfs-aggregator.service", "s3-federation/README.md"):
        assert (ROOT / "examples" / name).is_file(), name


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("\n## ", 2)[1]
    assert "make demo" in head and "make test" in head


def test_help_texts_carry_an_example():
    from fedfs.cli import main
    import click

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield " ".join(path), cmd

    for name, cmd in walk(main, ["fedfs"]):
        assert re.search(r"Example", cmd.help or ""), f"`{name} --help` has no example"
