"""Configuration typos are errors: unknown ``--config`` TOML keys and unknown ``FEDFS_*`` variables.

The names fedfs knows come from the click command tree itself (every option's name and
environment variable), plus :data:`OTHER_VARIABLES`, the one list of ``FEDFS_*`` variables
that code outside the CLI's options reads. A TOML file may be shared by several commands
(``site.toml`` for ``site run`` and ``export``), so a key that *any* command taking
``--config`` knows is accepted and simply unused by the others; only a key that no command
knows is an error. The same holds for ``FEDFS_*`` variables. Each error names the file or
variable and suggests the closest known name (an option's short flag counts: ``FEDFS_NP``
is ``-np``, i.e. ``FEDFS_NUM_PROCESSES``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import click

from ..errors import ConfigError

__all__ = ["OTHER_VARIABLES", "Names", "check_environment", "config_defaults", "known_names", "toml_key"]

PREFIX = "FEDFS_"

#: ``FEDFS_*`` variables read outside the commands' options (variable -> what reads it and why).
OTHER_VARIABLES: dict[str, str] = {
    "FEDFS_STORAGE_OPTIONS": "backend options as a JSON object, under any `-so` (fedfs.store.options)",
    "FEDFS_SMB_USER": "SMB user name, when the URL and `-so username=` give none (fedfs.store.smb_session)",
    "FEDFS_SMB_PASSWORD": "SMB password; never put it in a URL or a config file (fedfs.store.smb_session)",
    "FEDFS_TORCH_THREADS": "torch threads per party; `fedfs simulate` sets it for its parties (fedfs.nnunet.work)",
    "FEDFS_FAULTS": "crash points armed for fault-injection tests (fedfs.roles.faults)",
    "FEDFS_TOY_CLOCK_OFFSET_S": "clock shift of a toy party in tests (fedfs.testing.toy_party)",
}


def toml_key(param: click.Parameter) -> str:
    """The ``--config`` key of ``param``: its long flag (``federation_digest`` for ``--federation-digest``),
    else its name (``dataset`` for ``-d``); ``-`` and ``_`` are interchangeable in the file."""
    longs = [d for d in param.opts if d.startswith("--")]
    return longs[0][2:].replace("-", "_") if longs else param.name or ""


def _keys(param: click.Parameter) -> set[str]:
    """The keys a file may use for ``param``: :func:`toml_key` and, as written before, its name in the code."""
    return {toml_key(param), param.name or ""}


def _takes_config(cmd: click.Command) -> bool:
    return any(p.name == "config" for p in cmd.params)


def _aliases(param: click.Parameter) -> Iterator[str]:
    """Every way a user may spell ``param``: its name and its flags without dashes (``np`` for ``-np``)."""
    yield from _keys(param)
    for decl in [*param.opts, *param.secondary_opts]:
        yield decl.lstrip("-").replace("-", "_").lower()


def _envvars(param: click.Parameter) -> list[str]:
    env = param.envvar
    return [env] if isinstance(env, str) else list(env or [])


def _commands(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _commands(sub, f"{path} {name}")


@dataclass
class Names:
    """What the command tree knows: TOML keys (spelling -> key) and variables (spelling -> variable)."""

    toml: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    keys: list[set[str]] = field(default_factory=list)  # per parameter of a command taking --config: its keys


def known_names(root: click.Command) -> Names:
    """Every TOML key and ``FEDFS_*`` variable some command under ``root`` reads."""
    names = Names(env={v[len(PREFIX):].lower(): v for v in OTHER_VARIABLES})
    for _, cmd in _commands(root, root.name or "fedfs"):
        for param in cmd.params:
            if _takes_config(cmd) and param.name != "config":
                names.toml.update({a: toml_key(param) for a in _aliases(param)})
                names.keys.append(_keys(param))
            for var in _envvars(param):
                if var.startswith(PREFIX):
                    names.env.update({a: var for a in _aliases(param)})
                    names.env[var[len(PREFIX):].lower()] = var
    return names


def did_you_mean(word: str, spellings: Mapping[str, str]) -> str | None:
    """The known name ``word`` most probably means: an exact alias first, then the closest spelling."""
    word = word.lower().replace("-", "_")
    if word in spellings:
        return spellings[word]
    close = difflib.get_close_matches(word, list(spellings), n=1, cutoff=0.6)
    return spellings[close[0]] if close else None


def _name(ctx: click.Context) -> str:
    """``fedfs site run``, however the program was invoked."""
    parts = []
    while ctx.parent is not None:
        parts.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["fedfs", *reversed(parts)])


def _hint(suggestion: str | None) -> str:
    return f" (did you mean {suggestion!r}?)" if suggestion else ""


def config_defaults(path: str, data: Mapping[str, Any], ctx: click.Context) -> dict[str, Any]:
    """The defaults the TOML file ``path`` gives ``ctx``'s command (by parameter name); a key another
    command takes is skipped, a key no command takes is a ConfigError with a did-you-mean."""
    names = known_names(ctx.find_root().command)
    params = [p for p in ctx.command.params if p.name and p.name != "config"]
    mine = {k: p.name for p in params for k in _keys(p)}
    everyone = {k for p_keys in names.keys for k in p_keys}
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        norm = key.replace("-", "_")
        if norm in mine:
            defaults[mine[norm]] = value
        elif norm not in everyone:
            own = {a: toml_key(p) for p in params for a in _aliases(p)}
            suggestion = did_you_mean(norm, own) or did_you_mean(norm, names.toml)
            takes = ", ".join(sorted(toml_key(p) for p in params))
            raise ConfigError(f"{path}: unknown key {key!r}{_hint(suggestion)}; `{_name(ctx)}` takes {takes} "
                              "(keys of other fedfs commands are allowed too; docs/cli.md lists them)")
    return defaults


def check_environment(environ: Mapping[str, str], ctx: click.Context) -> None:
    """Raise ConfigError for a ``FEDFS_*`` variable in ``environ`` that nothing in fedfs reads."""
    names = known_names(ctx.find_root().command)
    known = set(names.env.values())
    for var in sorted(environ):
        if var.startswith(PREFIX) and var not in known:
            suggestion = did_you_mean(var[len(PREFIX):], names.env)
            raise ConfigError(f"unknown environment variable {var}{_hint(suggestion)}: no fedfs command reads it; "
                              "unset it (docs/cli.md lists every variable)")
