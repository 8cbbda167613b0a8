"""Where an SMB bucket is and how to log in to it: the URL, the options, one session per store.

URL: ``smb://[user@]host[:port]/share[/prefix/...]``. Options ``host``, ``port``,
``username`` and ``password`` override the URL; the username may also come from
``FEDFS_SMB_USER`` and the password from ``FEDFS_SMB_PASSWORD``. A password inside
the URL is refused (:class:`~fedfs.errors.ConfigError`): URLs end up in logs and
error messages, passwords must not.

Each store has its own :class:`SMBSession`: its own smbclient connection pool and its own
client GUID (smbclient would give every connection of the process the same GUID, and
Samba's multichannel then hands concurrent connections between its processes, which was
seen to hang session setup). Threads of one store share its connection.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import smbclient
from smbprotocol.connection import Connection
from smbprotocol.exceptions import SMBOSError

from ..errors import ConfigError, StoreUnavailable
from ..protocol.layout import check_key

__all__ = ["DEFAULT_PORT", "OPTIONS", "SMBLocation", "SMBSession"]

DEFAULT_PORT = 445
#: The storage options an SMB bucket takes.
OPTIONS = frozenset({"host", "port", "username", "password", "encrypt", "timeout", "hardlinks"})


@dataclass(frozen=True)
class SMBLocation:
    """An SMB bucket's address and login, parsed and checked from its URL and options."""

    host: str
    port: int
    share: str
    prefix: str
    username: str | None
    password: str | None = field(repr=False)
    encrypt: bool | None
    timeout: float
    hardlinks: bool

    @classmethod
    def parse(cls, url: str, options: dict[str, Any]) -> SMBLocation:
        """Read ``url`` and ``options``; raise ConfigError for anything that cannot work."""
        unknown = set(options) - OPTIONS
        if unknown:
            raise ConfigError(f"unknown SMB option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")
        parts = urlsplit(url)
        if parts.scheme != "smb":
            raise ConfigError(f"{url!r} is not an smb:// URL")
        if parts.password is not None:
            raise ConfigError("put the SMB password in FEDFS_SMB_PASSWORD or the 'password' option, not in the URL")
        host: str = options.get("host") or parts.hostname or ""
        if not host:
            raise ConfigError(f"{url!r} names no SMB host")
        try:
            port = int(options.get("port") or parts.port or DEFAULT_PORT)
        except ValueError as exc:
            raise ConfigError(f"bad SMB port in {url!r}") from exc
        segments = [unquote(s) for s in parts.path.split("/") if s]
        if not segments:
            raise ConfigError(f"{url!r} names no share: use smb://host/share[/prefix]")
        prefix = "/".join(segments[1:])
        if prefix:
            check_key(prefix)
        return cls(
            host=host,
            port=port,
            share=segments[0],
            prefix=prefix,
            username=(options.get("username") or (unquote(parts.username) if parts.username else None)
                      or os.environ.get("FEDFS_SMB_USER") or None),
            password=options.get("password") or os.environ.get("FEDFS_SMB_PASSWORD") or None,
            encrypt=options.get("encrypt"),
            timeout=float(options.get("timeout", 30)),
            hardlinks=bool(options.get("hardlinks", True)),
        )

    @property
    def url(self) -> str:
        """The canonical URL, without the password: ``smb://user@host:port/share/prefix``."""
        user = f"{self.username}@" if self.username else ""
        path = "/".join(s for s in (self.share, self.prefix) if s)
        return f"smb://{user}{self.host}:{self.port}/{path}"

    @property
    def root(self) -> str:
        """The UNC path of the bucket's folder."""
        prefix = "\\" + self.prefix.replace("/", "\\") if self.prefix else ""
        return f"\\\\{self.host}\\{self.share}{prefix}"


class SMBSession:
    """One store's logged-in SMB session, made on first use and remade if its connection dropped."""

    def __init__(self, location: SMBLocation) -> None:
        self.location = location
        self._cache: dict[str, Any] = {}  # this session's own smbclient connection pool
        self._lock = threading.Lock()
        self._share_seen = False
        self._client_guid = uuid.uuid4()
        self._pool_key = f"{location.host.lower()}:{location.port}"  # smbclient's key for its pool

    @property
    def kw(self) -> dict[str, Any]:
        """The keyword arguments every smbclient call of this session takes."""
        loc = self.location
        return {
            "username": loc.username,
            "password": loc.password,
            "port": loc.port,
            "connection_timeout": loc.timeout,
            "connection_cache": self._cache,
            **({"encrypt": loc.encrypt} if loc.encrypt is not None else {}),
        }

    def connect(self) -> None:
        """Make sure a session exists (serialised, so threads share one connection).

        Raises smbprotocol's exceptions (the caller translates them), and StoreUnavailable
        for a share the server does not have.
        """
        loc = self.location
        with self._lock:
            pooled = self._cache.get(self._pool_key)
            if pooled is None or not pooled.transport.connected:
                connection = Connection(self._client_guid, loc.host, loc.port)
                connection.connect(timeout=loc.timeout)
                self._cache[self._pool_key] = connection
            smbclient.register_session(
                loc.host,
                username=loc.username,
                password=loc.password,
                port=loc.port,
                encrypt=loc.encrypt,
                connection_timeout=loc.timeout,
                connection_cache=self._cache,
            )
            if not self._share_seen:
                # A missing share otherwise looks like a missing key (STATUS_NOT_FOUND from DFS).
                try:
                    smbclient.stat(f"\\\\{loc.host}\\{loc.share}", **self.kw)
                except SMBOSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    raise StoreUnavailable(f"{loc.url}: no share {loc.share!r} on {loc.host}") from exc
                self._share_seen = True

    def close(self) -> None:
        """Drop this session's connections."""
        with self._lock:
            smbclient.reset_connection_cache(fail_on_error=False, connection_cache=self._cache)
