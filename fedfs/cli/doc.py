"""Render the click command tree as Markdown: ``python -m fedfs.cli.doc > docs/cli.md``.

``tests/test_docs.py`` checks that docs/cli.md equals this output, so the CLI
reference cannot drift from the code.
"""

from __future__ import annotations

import click

HEADER = """# Command-line reference

Generated from the code by `python -m fedfs.cli.doc > docs/cli.md` (a test keeps it in sync).
The commands that take `--config FILE` read option defaults from that TOML file, and most of
their options from an environment variable as well; the table under each command lists the
variable and the key of every option (a flag on the command line wins over the environment,
which wins over the file). Keys are written `key = value` (`-` and `_` are the same in a key).

Typos are errors, not silently ignored. A TOML key that no fedfs command takes, or a `FEDFS_*`
variable that nothing reads, stops the command with the file or variable and the closest
known name (`FEDFS_NP`: did you mean `FEDFS_NUM_PROCESSES`?). One file may serve several
commands (a `site.toml` for `fedfs site run` and `fedfs export`): a key that another command
takes (`watch` for `fedfs export`) is accepted and unused.

## Exit codes

{codes}

## Other environment variables

Read outside the commands' options (every other `FEDFS_*` variable is an error):

{variables}
"""


def _context(cmd: click.Command, name: str) -> click.Context:
    """A context as the CLI makes it (the command's own settings, e.g. ``-h``), at a fixed width."""
    settings = {**cmd.context_settings, "terminal_width": 100, "max_content_width": 100}
    return click.Context(cmd, info_name=name, **settings)


def _sources(cmd: click.Command) -> list[str]:
    """A table of where ``cmd``'s options may also come from: environment variable and TOML key."""
    from .strict import PREFIX, toml_key

    config = any(p.name == "config" for p in cmd.params)
    rows = []
    for p in cmd.params:
        env = [v for v in ([p.envvar] if isinstance(p.envvar, str) else p.envvar or []) if v.startswith(PREFIX)]
        if p.name == "config" or not (env or config):
            continue
        flag = ", ".join(p.opts) if isinstance(p, click.Option) else p.human_readable_name
        rows.append(f"| `{flag}` | {', '.join(f'`{v}`' for v in env) or '–'} | "
                    f"{f'`{toml_key(p)}`' if config else '–'} |")
    return ["", "| option | environment | `--config` key |", "|---|---|---|", *rows] if rows else []


def _walk(cmd: click.Command, path: list[str], out: list[str]) -> None:
    ctx = _context(cmd, " ".join(path))
    if path[1:]:
        out.append(f"\n## `{' '.join(path)}`\n")
        out.append("```text")
        out.append(cmd.get_help(ctx).rstrip())
        out.append("```")
        out.extend(_sources(cmd))
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.list_commands(ctx)):
            _walk(cmd.get_command(ctx, name), path + [name], out)


def render() -> str:
    from ..errors import EXIT_CODES
    from .app import main

    from .strict import OTHER_VARIABLES

    codes = "\n".join(["| code | meaning |", "|---|---|", *(f"| {c} | {m} |" for c, m in EXIT_CODES.items())])
    variables = "\n".join(["| variable | read for |", "|---|---|",
                           *(f"| `{v}` | {what} |" for v, what in sorted(OTHER_VARIABLES.items()))])
    out = [HEADER.format(codes=codes, variables=variables).rstrip(), "\n## `fedfs`\n", "```text",
           main.get_help(_context(main, "fedfs")).rstrip(), "```"]
    _walk(main, ["fedfs"], out)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import os

    os.environ.setdefault("COLUMNS", "100")
    print(render(), end="")
