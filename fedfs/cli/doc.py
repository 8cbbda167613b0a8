"""Render the click command tree as Markdown: ``python -m fedfs.cli.doc > docs/cli.md``.

``tests/test_docs.py`` checks that docs/cli.md equals this output, so the CLI
reference cannot drift from the code.
"""

from __future__ import annotations

import click

HEADER = """# Command-line reference

Generated from the code by `python -m fedfs.cli.doc > docs/cli.md` (a test keeps it in sync).
Every option can also be given as an environment variable `FEDFS_<OPTION>` and, for role
commands, as a key in a TOML file passed with `--config`.

## Exit codes

{codes}
"""


def _context(cmd: click.Command, name: str) -> click.Context:
    """A context as the CLI makes it (the command's own settings, e.g. ``-h``), at a fixed width."""
    settings = {**cmd.context_settings, "terminal_width": 100, "max_content_width": 100}
    return click.Context(cmd, info_name=name, **settings)


def _walk(cmd: click.Command, path: list[str], out: list[str]) -> None:
    ctx = _context(cmd, " ".join(path))
    if path[1:]:
        out.append(f"\n## `{' '.join(path)}`\n")
        out.append("```text")
        out.append(cmd.get_help(ctx).rstrip())
        out.append("```")
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.list_commands(ctx)):
            _walk(cmd.get_command(ctx, name), path + [name], out)


def render() -> str:
    from ..errors import EXIT_CODES
    from .app import main

    codes = "\n".join(["| code | meaning |", "|---|---|", *(f"| {c} | {m} |" for c, m in EXIT_CODES.items())])
    out = [HEADER.format(codes=codes).rstrip(), "\n## `fedfs`\n", "```text",
           main.get_help(_context(main, "fedfs")).rstrip(), "```"]
    _walk(main, ["fedfs"], out)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import os

    os.environ.setdefault("COLUMNS", "100")
    print(render(), end="")
