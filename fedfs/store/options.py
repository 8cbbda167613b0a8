"""Backend options from flags and the environment (``-so KEY=VALUE``, ``FEDFS_STORAGE_OPTIONS``)."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Collection, Iterable
from typing import Any

from ..errors import ConfigError

__all__ = ["check_storage_options", "parse_storage_options", "SECRET_OPTION_NAMES"]

#: Option names that are secrets: never taken as flags, only from the environment.
SECRET_OPTION_NAMES = frozenset({"password", "secret", "key", "token", "secret_access_key"})


def parse_storage_options(pairs: Iterable[str] = ()) -> dict[str, Any]:
    """``KEY=VALUE`` pairs over ``FEDFS_STORAGE_OPTIONS`` (JSON); values parsed as JSON when they parse."""
    opts: dict[str, Any] = {}
    env = os.environ.get("FEDFS_STORAGE_OPTIONS")
    if env:
        try:
            opts.update(json.loads(env))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"FEDFS_STORAGE_OPTIONS is not valid JSON: {exc.msg}") from None
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"storage option {pair!r} must look like key=value")
        k, v = pair.split("=", 1)
        if k.lower() in SECRET_OPTION_NAMES:
            raise ConfigError(f"secrets are not taken as flags: set {k} in the environment (see docs/security.md)")
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return opts


def check_storage_options(url: str, kind: str, options: dict[str, Any], accepted: Collection[str]) -> None:
    """Refuse options a backend does not take (a library would raise a bare TypeError later),
    naming the closest valid one and listing them all."""
    unknown = sorted(set(options) - set(accepted))
    if not unknown:
        return
    if not accepted:
        raise ConfigError(f"{url}: {kind} takes no storage options (got {', '.join(unknown)}); remove the -so flags "
                          "and FEDFS_STORAGE_OPTIONS")
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(accepted), n=1, cutoff=0.6)
        if not close:  # "endpoint" for "endpoint_url": a prefix is a likelier slip than a typo
            close = sorted(a for a in accepted if a.startswith(name) or name.startswith(a))[:1]
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"{url}: unknown storage option {', '.join(hints)}; {kind} takes: {', '.join(sorted(accepted))}")
