"""Which machine a site is: a random installation token, made once in its workdir.

Two machines holding one private key sign alike, so a signature cannot tell them apart. A
site therefore keeps a random token in ``workdir/installation`` (made at its first start,
never changed) and signs every envelope with it: the writer token becomes
``<installation>.<random>`` (:func:`fedfs.trust.signing.new_writer_token`). At its first step,
the site reads back its own heartbeat, census and plans, and its heartbeat again at most once a
minute while it runs.
One signed by its own name but by another installation means that another machine publishes
as this site (two daemons share one key, or a key was copied), and the site stops with
:class:`~fedfs.errors.Blocked` rather than mix its work with the other machine's. It writes
nothing then, so the other machine is not disturbed. Documents from before installations
existed name none and are never held against anyone. The aggregator keeps no token: its
steps are deterministic, so a second run of it publishes the same bytes or finds the work
done (:mod:`fedfs.roles.aggregator`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import time
from pathlib import Path

from ..errors import Blocked, ConfigError, NotFound, StoreError, ValidationError
from ..protocol import layout
from ..protocol.documents import Document
from ..protocol.schema import Heartbeat, PlansDocument, SiteCensus
from ..trust.bucket import Bucket
from ..trust.signing import Identity, installation_of

__all__ = ["INSTALLATION_FILE", "Installation"]

#: The file in a party's workdir that holds its installation token.
INSTALLATION_FILE = "installation"

#: While running, a site reads its heartbeat back at most this often (seconds): one small read.
CHECK_EVERY_S = 60.0

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _load_or_create(path: Path) -> str:
    """The token in ``path``, created (exclusively: concurrent starts agree on one) if absent."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        tmp.write_text(secrets.token_hex(8) + "\n")
        try:
            os.link(tmp, path)  # fails if another process made it first: then its token wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    token = path.read_text().strip()
    if not _TOKEN.fullmatch(token):
        raise ConfigError(f"{path}: not an installation token ({token[:40]!r}); letters, digits, - and _ only")
    return token


class Installation:
    """This site's installation token and the check that no other machine publishes as it."""

    def __init__(self, workdir: Path, party: str) -> None:
        self.path = workdir / INSTALLATION_FILE
        self.party = party
        self.token = _load_or_create(self.path)
        self.check_every_s = CHECK_EVERY_S
        self._checked = False
        self._heartbeat_checked_at = 0.0

    def sign_as(self, identity: Identity) -> Identity:
        """``identity``, signing with this installation's writer tokens."""
        return dataclasses.replace(identity, installation=self.token)

    def check_once(self, bucket: Bucket) -> None:
        """At the first step: the party's heartbeat, census and plans must be this installation's."""
        if self._checked:
            return
        for what, key, cls in (("heartbeat", layout.site_heartbeat(self.party), Heartbeat),
                               ("census", layout.site_census(self.party), SiteCensus),
                               ("plans", layout.site_plans(self.party), PlansDocument)):
            self.check(bucket, key, cls, what)
        self._checked = True
        self._heartbeat_checked_at = time.monotonic()

    def check_heartbeat(self, bucket: Bucket) -> None:
        """Before a heartbeat is written, at most every ``check_every_s``: is the one there this installation's?"""
        now = time.monotonic()
        if now - self._heartbeat_checked_at < self.check_every_s:
            return
        self._heartbeat_checked_at = now
        self.check(bucket, layout.site_heartbeat(self.party), Heartbeat, "heartbeat")

    def check(self, bucket: Bucket, key: str, cls: type[Document], what: str) -> None:
        """Raise Blocked if the document at ``key``, verified as the party's own, was written by
        another installation. A missing, unverifiable or unreadable document proves nothing."""
        try:
            signed = bucket.read(key, cls)
        except (NotFound, ValidationError, StoreError):
            return
        other = installation_of(signed.writer_token)
        if other is not None and other != self.token:
            raise Blocked(self.message(what, bucket.store.describe(key), other), key=key)

    def message(self, what: str, where: str, other: str) -> str:
        return (f"another machine is publishing as {self.party}: its {what} ({where}) was written by installation "
                f"{other}, this is {self.token} ({self.path}). Two daemons share one key, or a key was copied: stop "
                f"the other machine's fedfs, or give each party its own key (`fedfs keygen`). If this machine "
                f"replaces installation {other} (whose workdir is gone), write {other} into {self.path} "
                f"and start again")
