"""Secure aggregation (Bonawitz et al. 2017, with Bell et al.'s SecAgg+ neighbour graph): each
party's step as a pure function of the stage documents it has read. No I/O.

A session sums the sites' inputs (dicts of uint32/uint64 tensors, :mod:`.fixedpoint`) so that
the aggregator learns only the sum. Site ``i`` adds to its input a self mask from its seed
``b_i`` and, for each neighbour ``j`` in the shares roster, ``+PRG(s_ij)`` if ``i < j`` else
``-PRG(s_ij)``, where ``s_ij`` comes from X25519 between their ephemeral mask keys: summed over
the survivors the pairwise masks cancel. ``b_i`` and the mask private key are Shamir-shared
among the neighbours (threshold ``t``). At unmasking, every survivor reveals, per neighbour,
the share of ``b_j`` if ``j`` survived, or the share of ``j``'s mask key if ``j`` dropped:
never both. The aggregator removes the survivors' self masks and the dropouts' pairwise
masks, and the sum is exact (modular integers).

Every site step is deterministic given the site's :class:`SiteSecrets` (made once, persisted
before anything is published), so a re-run after a crash republishes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import ValidationError
from . import masks, shamir
from .secagg_documents import (
    SecAggKeys, SecAggMasked, SecAggRoster, SecAggShares, SecAggUnmask, check_session, digest,
)

__all__ = ["SessionParams", "SiteSecrets", "advertise", "share_keys", "mask_input", "receive_shares",
           "unmask_shares", "make_roster", "add_masked", "remove_masks", "unmask_sum", "layout_digest", "MIN_SITES"]

log = logging.getLogger("fedfs.privacy.secagg")

#: Fewer sites than this cannot hide one site's input from the others' view of the sum.
MIN_SITES = 3


@dataclass(frozen=True)
class SessionParams:
    """What every party of a session agrees on without a message: who takes part, the
    threshold and the SecAgg+ neighbour graph (a circulant graph over an order drawn from
    ``graph_seed`` and the session; ``degree = N - 1`` is Bonawitz's complete graph)."""

    session: str
    sites: tuple[str, ...]
    threshold: int
    degree: int
    graph_seed: int = 0

    @classmethod
    def make(cls, session: str, sites: list[str] | tuple[str, ...], *, degree: int | None = None,
             threshold: int | None = None, graph_seed: int = 0) -> SessionParams:
        """Parameters with the defaults: the complete graph, and ``t`` a strict majority of each
        neighbourhood (a site and its neighbours)."""
        names = tuple(sorted(set(sites)))
        if len(names) < MIN_SITES:
            raise ValidationError(f"secure aggregation needs at least {MIN_SITES} sites, got {len(names)}: "
                                  "with two, each learns the other's input from the sum")
        degree = len(names) - 1 if degree is None else degree
        if threshold is None:
            threshold = (degree + 1) // 2 + 1
        return cls(check_session(session), names, threshold, degree, graph_seed)

    def __post_init__(self) -> None:
        n = len(self.sites)
        if not 2 <= self.degree <= n - 1 or (self.degree < n - 1 and self.degree % 2):
            raise ValidationError(f"neighbour degree {self.degree} must be even and in 2..{n - 1}, or {n - 1}")
        m = self.degree + 1
        if not m // 2 + 1 <= self.threshold <= m:
            raise ValidationError(f"threshold {self.threshold} must be a strict majority of a neighbourhood "
                                  f"({m // 2 + 1}..{m}): fewer would let a minority reconstruct a secret")

    def index(self, site: str) -> int:
        """The site's Shamir x-coordinate (1-based, in sorted order)."""
        return self.sites.index(site) + 1

    def neighbours(self, site: str) -> tuple[str, ...]:
        n = len(self.sites)
        if self.degree == n - 1:
            return tuple(s for s in self.sites if s != site)
        key = f"{self.graph_seed}\x00{self.session}".encode()
        order = sorted(self.sites, key=lambda s: hashlib.sha256(key + b"\x00" + s.encode()).digest())
        p = order.index(site)
        near = {order[(p + d) % n] for k in range(1, self.degree // 2 + 1) for d in (k, -k)}
        return tuple(sorted(near))


@dataclass(frozen=True)
class SiteSecrets:
    """A site's secret state for one session; kept in its workdir, never in the bucket."""

    session: str
    site: str
    enc_private: bytes
    mask_private: bytes
    self_seed: bytes
    share_seed: bytes

    @classmethod
    def new(cls, session: str, site: str) -> SiteSecrets:
        return cls(session, site, os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(32))

    def to_json(self) -> bytes:
        return json.dumps({"session": self.session, "site": self.site, "enc_private": self.enc_private.hex(),
                           "mask_private": self.mask_private.hex(), "self_seed": self.self_seed.hex(),
                           "share_seed": self.share_seed.hex()}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SiteSecrets:
        d = json.loads(data)
        return cls(d["session"], d["site"], *(bytes.fromhex(d[k]) for k in
                                              ("enc_private", "mask_private", "self_seed", "share_seed")))

    def shares(self, params: SessionParams, holders: list[str]) -> tuple[dict[str, int], dict[str, int]]:
        """Shares of (self-mask seed, mask key) for each holder (deterministic from share_seed)."""
        xs = [params.index(h) for h in holders]
        b = shamir.split(self.self_seed, xs, params.threshold, self.share_seed + b"self")
        k = shamir.split(self.mask_private, xs, params.threshold, self.share_seed + b"key")
        return ({h: b[params.index(h)] for h in holders}, {h: k[params.index(h)] for h in holders})


def _check_roster(roster: SecAggRoster, params: SessionParams, stage: str, previous: SecAggRoster | None) -> None:
    where = f"{stage} roster of session {params.session}"
    if roster.session != params.session or roster.stage != stage:
        raise ValidationError(f"{where}: is the {roster.stage} roster of session {roster.session}")
    unknown = set(roster.sites) - set(params.sites)
    if unknown:
        raise ValidationError(f"{where}: names non-members {sorted(unknown)}")
    if previous is not None:
        if roster.previous != digest(previous):
            raise ValidationError(f"{where}: does not follow the {previous.stage} roster")
        if not set(roster.sites) | set(roster.dropped) <= set(previous.sites):
            raise ValidationError(f"{where}: names sites the {previous.stage} roster does not")
        if stage == "masked" and set(roster.sites) | set(roster.dropped) != set(previous.sites):
            raise ValidationError(f"{where}: survivors and dropouts must be exactly the sites that shared")


def _require_quorum(params: SessionParams, me: str, sites: list[str], what: str) -> None:
    """A roster must keep at least ``t`` of our neighbourhood: an aggregator that isolates a site
    (everyone else "dropped") would otherwise learn that site's input as the sum."""
    kept = [j for j in (me, *params.neighbours(me)) if j in sites]
    if len(kept) < params.threshold:
        raise ValidationError(f"the {what} of session {params.session} keeps {len(kept)} of {me}'s neighbourhood, "
                              f"below the threshold {params.threshold}; refusing to go on")


def advertise(secrets: SiteSecrets) -> SecAggKeys:
    """Stage 1: the site's ephemeral public keys."""
    return SecAggKeys(site=secrets.site, session=secrets.session,
                      enc_key=masks.b64(masks.public_key_of(secrets.enc_private)),
                      mask_key=masks.b64(masks.public_key_of(secrets.mask_private)))


def _aad(session: str, sender: str, receiver: str) -> bytes:
    return f"fedfs-secagg-share\x00{session}\x00{sender}\x00{receiver}".encode()


def share_keys(params: SessionParams, secrets: SiteSecrets, roster: SecAggRoster,
               keys: Mapping[str, SecAggKeys]) -> SecAggShares:
    """Stage 2: encrypt to each neighbour in the keys roster its shares of our two secrets."""
    me = secrets.site
    _check_roster(roster, params, "keys", None)
    if me not in roster.sites:
        raise ValidationError(f"{me}: the keys roster of session {params.session} leaves this site out")
    peers = [j for j in params.neighbours(me) if j in roster.sites]
    missing = [j for j in peers if j not in keys]
    if missing:
        raise ValidationError(f"{me}: no valid keys document from {missing}, whom the keys roster lists")
    if len(peers) + 1 < params.threshold:
        raise ValidationError(f"{me}: only {len(peers)} neighbours advertised keys; threshold {params.threshold} "
                              "cannot be met")
    b, k = secrets.shares(params, peers + [me])
    out = {}
    for j in peers:
        msg = json.dumps({"from": me, "to": j, "session": params.session, "self": shamir.share_to_hex(b[j]),
                          "key": shamir.share_to_hex(k[j])}, sort_keys=True).encode()
        key = masks.share_key(secrets.enc_private, masks.unb64(keys[j].enc_key, j, 32), params.session, me, j)
        out[j] = masks.b64(masks.encrypt(key, msg, _aad(params.session, me, j)))
    return SecAggShares(site=me, session=params.session, roster=digest(roster), ciphertexts=out)


def receive_shares(params: SessionParams, secrets: SiteSecrets, keys: Mapping[str, SecAggKeys],
                   shares: Mapping[str, SecAggShares]) -> dict[str, tuple[int, int]]:
    """Decrypt the shares each neighbour sent us: peer -> (share of its seed, share of its key)."""
    me, out = secrets.site, {}
    for j, doc in sorted(shares.items()):
        where = f"shares of {j} for {me} (session {params.session})"
        if j not in params.neighbours(me) or me not in doc.ciphertexts or j not in keys:
            raise ValidationError(f"{where}: {j} is no neighbour, sent this site no share, or has no valid keys")
        key = masks.share_key(secrets.enc_private, masks.unb64(keys[j].enc_key, where, 32), params.session, j, me)
        plain = masks.decrypt(key, masks.unb64(doc.ciphertexts[me], where), _aad(params.session, j, me), where)
        try:
            msg = json.loads(plain)
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or not {"self", "key"} <= set(msg):
            raise ValidationError(f"{where}: the decrypted message is not a share message")
        if (msg.get("from"), msg.get("to"), msg.get("session")) != (j, me, params.session):
            raise ValidationError(f"{where}: the message is addressed to another party or session")
        out[j] = (shamir.share_from_hex(msg["self"], where), shamir.share_from_hex(msg["key"], where))
    return out


def mask_input(params: SessionParams, secrets: SiteSecrets, roster: SecAggRoster, keys: Mapping[str, SecAggKeys],
               inputs: Mapping[str, np.ndarray], keys_roster: SecAggRoster | None = None) -> dict[str, np.ndarray]:
    """Stage 3: our input plus our self mask plus signed pairwise masks with each neighbour
    that shared (the shares roster; checked to follow ``keys_roster`` when given). Modulo
    2**bits per tensor; the input is not changed."""
    me = secrets.site
    _check_roster(roster, params, "shares", keys_roster)
    missing = [j for j in params.neighbours(me) if j in roster.sites and j not in keys]
    if missing:
        raise ValidationError(f"{me}: no valid keys document from {missing}, whom the shares roster lists")
    if me not in roster.sites:
        raise ValidationError(f"{me}: the shares roster of session {params.session} leaves this site out")
    _require_quorum(params, me, roster.sites, "shares roster")
    out = {n: np.array(a, copy=True, order="C") for n, a in inputs.items()}
    scratch = {n: np.empty_like(a) for n, a in out.items()}
    masks.apply_mask(out, secrets.self_seed, +1, scratch)
    for j in params.neighbours(me):
        if j in roster.sites:
            seed = masks.pairwise_seed(secrets.mask_private, masks.unb64(keys[j].mask_key, j, 32),
                                       params.session, me, j)
            masks.apply_mask(out, seed, +1 if me < j else -1, scratch)
    return out


def unmask_shares(params: SessionParams, secrets: SiteSecrets, shares_roster: SecAggRoster,
                  masked_roster: SecAggRoster, received: Mapping[str, tuple[int, int]],
                  answered: str | None = None, masked_exists: Callable[[str], bool] | None = None) -> SecAggUnmask:
    """Stage 4: reveal, per neighbour, the share of its self-mask seed if it survived, or of its
    mask key if it dropped. Refuses (ValidationError) a roster that lists this site as dropped,
    one that differs from a roster answered before (``answered``: its digest, kept by the site),
    and, when ``masked_exists`` can tell, a claimed dropout whose masked input is published:
    revealing both kinds of share for one site would unmask it."""
    me = secrets.site
    _check_roster(masked_roster, params, "masked", shares_roster)
    where = f"masked roster of session {params.session}"
    if me in masked_roster.dropped:
        raise ValidationError(f"{where}: says {me} dropped, but {me} published its masked input; refusing to "
                              "reveal anything (a lying aggregator would learn masks)")
    if me not in masked_roster.sites:
        raise ValidationError(f"{where}: does not list {me} as a survivor")
    _require_quorum(params, me, masked_roster.sites, "masked roster")
    if answered is not None and answered != digest(masked_roster):
        raise ValidationError(f"{where}: differs from the roster {me} already answered; refusing a second answer")
    if masked_exists is not None:  # a dropout whose masked input the aggregator refused (signed, with the
        # reason) has a manifest in the bucket: that is no lie, and only its mask-key shares go out, never its b
        liars = [d for d in masked_roster.dropped if d not in masked_roster.rejected and masked_exists(d)]
        if liars:
            raise ValidationError(f"{where}: claims {liars} dropped, but their masked inputs are in the bucket; "
                                  "refusing to reveal their mask keys")
    own_b, _ = secrets.shares(params, [me] + [j for j in params.neighbours(me) if j in shares_roster.sites])
    selfs, keys = {}, {}
    for j in [me, *params.neighbours(me)]:  # a neighbour whose message we could not read gets nothing
        if j in masked_roster.sites and (j == me or j in received):
            share = own_b[me] if j == me else received[j][0]
            selfs[j] = shamir.share_to_hex(share)
        elif j in masked_roster.dropped and j in received:
            keys[j] = shamir.share_to_hex(received[j][1])
    return SecAggUnmask(site=me, session=params.session, roster=digest(masked_roster),
                        self_shares=selfs, key_shares=keys)


def make_roster(params: SessionParams, stage: str, present: list[str], previous: SecAggRoster | None,
                rejected: Mapping[str, str] | None = None) -> SecAggRoster:
    """The aggregator's roster closing ``stage``: the sites of the previous roster that made it.
    ``rejected`` (masked stage): site -> why its masked input was refused; such a site is a
    dropout, recorded with the reason. ValidationError when the threshold can no longer be met
    (the session cannot finish), naming the refused inputs that took it below."""
    rejected = dict(rejected or {})
    base = list(params.sites) if previous is None else previous.sites
    sites = sorted((set(present) & set(base)) - set(rejected))
    dropped = sorted(set(base) - set(sites)) if stage == "masked" else []
    for s in sites + dropped:
        holders = [j for j in (s, *params.neighbours(s)) if j in sites]
        if len(holders) < params.threshold:
            why = "".join(f"; {r}'s masked input was refused: {rejected[r]}" for r in sorted(rejected))
            raise ValidationError(f"session {params.session}, {stage}: {s}'s secrets have {len(holders)} holders "
                                  f"left, below the threshold {params.threshold}; the session cannot finish{why}")
    return SecAggRoster(session=params.session, stage=stage, sites=sites, dropped=dropped,
                        previous="" if previous is None else digest(previous),
                        rejected={r: rejected[r][:2000] for r in sorted(rejected) if r in dropped})


def layout_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 of the names, shapes and word types of a masked input."""
    spec = [[n, list(arrays[n].shape), arrays[n].dtype.str] for n in sorted(arrays)]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def add_masked(total: dict[str, np.ndarray] | None, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fold one masked input into the running sum (modulo each word size); the first one starts it."""
    if total is None:
        return {n: np.array(a, copy=True, order="C") for n, a in arrays.items()}
    if layout_digest(total) != layout_digest(arrays):
        raise ValidationError("the masked inputs differ in tensor layout")
    for n in total:
        np.add(total[n], arrays[n], out=total[n])
    return total


def remove_masks(params: SessionParams, keys: Mapping[str, SecAggKeys], masked_roster: SecAggRoster,
                 total: dict[str, np.ndarray], unmasks: Mapping[str, SecAggUnmask]) -> dict[str, np.ndarray]:
    """From the sum of the survivors' masked inputs, remove their self masks (seeds rebuilt from
    ``t`` shares) and the dropouts' pairwise masks (keys rebuilt); in place, and returned."""
    survivors = masked_roster.sites
    scratch = {n: np.empty_like(a) for n, a in total.items()}
    roster_digest = digest(masked_roster)
    docs = {r: u for r, u in unmasks.items() if r in survivors and u.roster == roster_digest}

    def rebuild(peer: str, kind: str) -> bytes:
        shares = {params.index(r): shamir.share_from_hex(getattr(u, kind)[peer], f"unmask of {r}")
                  for r, u in docs.items() if peer in getattr(u, kind)}
        secret, bad = shamir.reconstruct_robust(shares, params.threshold)
        if bad:
            culprits = sorted(params.sites[x - 1] for x in bad)
            log.warning("session %s: %s's shares of %s's %s do not fit the others; left out", params.session,
                        culprits, peer, "self-mask seed" if kind == "self_shares" else "mask key")
        return secret

    for s in survivors:
        masks.apply_mask(total, rebuild(s, "self_shares"), -1, scratch)
    for d in masked_roster.dropped:
        private = rebuild(d, "key_shares")
        if masks.b64(masks.public_key_of(private)) != keys[d].mask_key:
            raise ValidationError(f"session {params.session}: the rebuilt mask key of {d} does not match its "
                                  "advertised key (altered shares)")
        for j in params.neighbours(d):
            if j in survivors:
                seed = masks.pairwise_seed(private, masks.unb64(keys[j].mask_key, j, 32), params.session, d, j)
                masks.apply_mask(total, seed, -1 if j < d else +1, scratch)
    return total


def unmask_sum(params: SessionParams, keys: Mapping[str, SecAggKeys], masked_roster: SecAggRoster,
               masked: Mapping[str, Mapping[str, np.ndarray]], unmasks: Mapping[str, SecAggUnmask]) -> dict[str, np.ndarray]:
    """The aggregator's last step: the survivors' masked inputs summed, their masks removed."""
    if sorted(masked) != masked_roster.sites:
        raise ValidationError(f"session {params.session}: masked inputs from {sorted(masked)}, "
                              f"survivors {masked_roster.sites}")
    total = None
    for s in masked_roster.sites:
        total = add_masked(total, masked[s])
    return remove_masks(params, keys, masked_roster, total, unmasks)
