"""The stage documents of a secure-aggregation session, and where they lie. Pure: no I/O.

One session (one round's sum, or one FFE merge) has four site stages and three aggregator
rosters, each a write-once signed document under its writer's folder::

    sites/<S>/secagg/<session>/keys.json      secagg-keys     S's ephemeral X25519 public keys
    aggregator/secagg/<session>/keys.json     secagg-roster   who advertised (U1)
    sites/<S>/secagg/<session>/shares.json    secagg-shares   S's Shamir shares, encrypted to each neighbour
    aggregator/secagg/<session>/shares.json   secagg-roster   who shared (U2): the sites that mask
    sites/<S>/secagg/<session>/masked.json    secagg-masked   S's masked input (a blob under sites/<S>/blobs/)
    aggregator/secagg/<session>/masked.json   secagg-roster   survivors (U3) and dropouts (U2 - U3)
    sites/<S>/secagg/<session>/unmask.json    secagg-unmask   S's shares: self-mask seeds of survivors,
                                                              mask keys of dropouts, never both for one peer

Each roster names the digest of the one before (``previous``), and every site document names
the digest of the roster it answers (``roster``), so a document answers exactly one view of
the session. The key functions live here until the protocol's layout module takes them.
"""

from __future__ import annotations

import hashlib
import re

from ..protocol.documents import Document, canonical_json, document, field, require
from ..protocol.layout import AGG_PREFIX, check_name, site_prefix
from ..protocol.schema import BlobRef
from .shamir import SHARE_BYTES

__all__ = ["STAGES", "ROSTER_STAGES", "check_session", "site_stage_key", "roster_key", "digest",
           "SecAggKeys", "SecAggShares", "SecAggMasked", "SecAggRoster", "SecAggUnmask"]

#: A site's stages, in order.
STAGES = ("keys", "shares", "masked", "unmask")
#: The aggregator's rosters, each closing the site stage of the same name.
ROSTER_STAGES = ("keys", "shares", "masked")
_SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_B64_KEY = re.compile(r"^[A-Za-z0-9+/]{43}=$")  # 32 raw bytes
_HEX_SHA = re.compile(r"^[0-9a-f]{64}$")
_HEX_SHARE = re.compile(rf"^[0-9a-f]{{{2 * SHARE_BYTES}}}$")
#: The most ciphertext text one share message may take (two shares, names, JSON, tag).
MAX_CIPHERTEXT_B64 = 1024


def check_session(session: object) -> str:
    """A session name (``v000003``, ``ffe-census``): a safe single key segment."""
    if not isinstance(session, str) or not _SESSION_RE.match(session) or ".." in session:
        from ..errors import InvalidName

        raise InvalidName(f"secure-aggregation session {session!r} must be 1-64 of [A-Za-z0-9_.-], "
                          "starting with a letter or digit")
    return session


def site_stage_key(site: str, session: str, stage: str) -> str:
    """``sites/<S>/secagg/<session>/<stage>.json``."""
    if stage not in STAGES:
        raise ValueError(f"unknown secure-aggregation stage {stage!r}")
    return site_prefix(site) + f"secagg/{check_session(session)}/{stage}.json"


def roster_key(session: str, stage: str) -> str:
    """``aggregator/secagg/<session>/<stage>.json``: the roster closing ``stage``."""
    if stage not in ROSTER_STAGES:
        raise ValueError(f"unknown roster stage {stage!r}")
    return AGG_PREFIX + f"secagg/{check_session(session)}/{stage}.json"


def digest(doc: Document) -> str:
    """sha256 of a document's canonical body (what a later stage names)."""
    return hashlib.sha256(canonical_json(doc.to_dict())).hexdigest()


def _sites(names: list[str], where: str, what: str) -> None:
    for s in names:
        check_name(s)
    require(names == sorted(set(names)), where, f"{what} must be sorted and distinct")


@document("secagg-keys")
class SecAggKeys(Document):
    """Stage 1: a site's two ephemeral X25519 public keys for one session (base64, 32 bytes)."""

    site: str
    session: str
    enc_key: str  # encrypts the shares sent to this site
    mask_key: str  # agrees the pairwise mask seeds

    def validate(self, where: str) -> None:
        check_name(self.site)
        check_session(self.session)
        require(bool(_B64_KEY.match(self.enc_key)) and bool(_B64_KEY.match(self.mask_key)), where,
                "enc_key and mask_key must be base64 of 32 bytes")
        require(self.enc_key != self.mask_key, where, "enc_key and mask_key must differ")


@document("secagg-shares")
class SecAggShares(Document):
    """Stage 2: the site's Shamir shares of its self-mask seed and mask key, one encrypted
    message (ChaCha20-Poly1305, base64) per neighbour in the keys roster."""

    site: str
    session: str
    roster: str  # digest of the keys roster answered
    ciphertexts: dict[str, str]

    def validate(self, where: str) -> None:
        check_name(self.site)
        check_session(self.session)
        require(bool(_HEX_SHA.match(self.roster)), where, "roster must be a sha256 hex digest")
        require(self.site not in self.ciphertexts, where, "a site sends no share message to itself")
        for peer, text in self.ciphertexts.items():
            check_name(peer)
            require(isinstance(text, str) and 0 < len(text) <= MAX_CIPHERTEXT_B64, where,
                    f"ciphertext for {peer!r} must be base64 of at most {MAX_CIPHERTEXT_B64} characters")


@document("secagg-masked")
class SecAggMasked(Document):
    """Stage 3: the manifest of a site's masked input (safetensors of uint32/uint64 tensors)."""

    site: str
    session: str
    roster: str  # digest of the shares roster (U2) the masks were made for
    blob: BlobRef
    layout: str  # sha256 of the tensor layout (names, shapes, word types)

    def validate(self, where: str) -> None:
        check_name(self.site)
        check_session(self.session)
        require(bool(_HEX_SHA.match(self.roster)) and bool(_HEX_SHA.match(self.layout)), where,
                "roster and layout must be sha256 hex digests")
        self.blob.validate(where)  # embedded documents are not validated on their own: its sha256 names files
        require(self.blob.key.startswith(site_prefix(self.site) + "blobs/"), where,
                "a masked input's blob lies under its own site's blobs/")


@document("secagg-roster")
class SecAggRoster(Document):
    """The aggregator's signed view closing a stage: the sites that made it (and, for
    ``masked``, those that shared but sent no masked input: the dropouts)."""

    session: str
    stage: str
    sites: list[str]
    dropped: list[str] = field(default_factory=list)
    previous: str = ""  # digest of the roster before (empty for the keys roster)
    rejected: dict[str, str] = field(default_factory=dict)  # masked: dropouts whose masked input was refused, why

    def validate(self, where: str) -> None:
        check_session(self.session)
        require(self.stage in ROSTER_STAGES, where, f"stage must be one of {ROSTER_STAGES}, got {self.stage!r}")
        _sites(self.sites, where, "sites")
        _sites(self.dropped, where, "dropped")
        require(not set(self.sites) & set(self.dropped), where, "a site cannot both survive and drop")
        require(self.stage == "masked" or not self.dropped, where, "only the masked roster names dropouts")
        require(set(self.rejected) <= set(self.dropped), where, "a refused masked input makes its site a dropout")
        require(all(isinstance(r, str) and len(r) <= 2000 for r in self.rejected.values()), where,
                "a refusal reason is a string of at most 2000 characters")
        require((self.stage == "keys") == (self.previous == ""), where,
                "every roster but the keys roster names the one before")
        require(self.previous == "" or bool(_HEX_SHA.match(self.previous)), where, "previous must be a sha256")


@document("secagg-unmask")
class SecAggUnmask(Document):
    """Stage 4: a survivor's shares for unmasking: of each surviving neighbour's self-mask seed,
    and of each dropped neighbour's mask key (hex field elements). Never both for one peer."""

    site: str
    session: str
    roster: str  # digest of the masked roster answered
    self_shares: dict[str, str]
    key_shares: dict[str, str]

    def validate(self, where: str) -> None:
        check_name(self.site)
        check_session(self.session)
        require(bool(_HEX_SHA.match(self.roster)), where, "roster must be a sha256 hex digest")
        both = set(self.self_shares) & set(self.key_shares)
        require(not both, where, f"reveals both shares for {sorted(both)}: that would unmask them")
        require(self.site not in self.key_shares, where, "a survivor reveals no share of its own mask key")
        for peer, text in {**self.self_shares, **self.key_shares}.items():
            check_name(peer)
            require(isinstance(text, str) and bool(_HEX_SHARE.match(text)), where,
                    f"share for {peer!r} must be {2 * SHARE_BYTES} hex digits")
