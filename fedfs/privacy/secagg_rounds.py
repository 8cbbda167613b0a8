"""Secure-aggregation sessions over a real bucket: each party's ``step()`` reads the stage
documents it needs, calls the pure step of :mod:`.secagg`, and publishes the result as a
signed write-once file (keys in :mod:`.secagg_documents`).

A step does at most one stage and says what it did (``advertised``, ``shared``, ``masked``,
``unmasked``, ``roster keys`` ..., ``waiting``, ``done``), so a daemon loop, a cron step or a
test drives it alike. Crash safety: a site makes its session secrets once and persists them
(``<workdir>/secagg/<session>/secrets.json``, mode 0600, fsync'd, atomically renamed) before
it publishes its keys; every later document is a pure function of those secrets and the
signed rosters, so a step killed anywhere and re-run republishes identical bytes (and the
bucket's exclusive publish accepts an identical body as success). The roster a site answered
at unmasking is persisted before it publishes, and a different one is refused ever after.
The aggregator's rosters are write-once: a re-run reads the published roster instead of
computing a new one. Before it closes the masked stage the aggregator reads and checks every
masked input: one that does not verify makes its site a dropout, named with the reason in the
roster's ``rejected`` (its masks are removed as any dropout's), so one corrupt file costs its
site the session, never the session itself; with a ``cache`` the verified copies are what the
sum reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Conflict, FedfsError, NotFound, StoreError, ValidationError
from ..protocol import layout as proto_layout
from ..protocol.documents import Document
from ..protocol.schema import FederationConfig
from ..trust.bucket import Bucket
from ..trust.signing import Identity
from . import fixedpoint, secagg
from .secagg_documents import (
    SecAggKeys, SecAggMasked, SecAggRoster, SecAggShares, SecAggUnmask, digest, roster_key, site_stage_key,
)

__all__ = ["SecureSite", "SecureAggregator", "session_params", "round_session", "site_round_step",
           "aggregator_round_step", "run_session", "decode_masked", "MAX_MASKED_BYTES", "DEFAULT_FIXED_POINT"]

#: The encoding of a training round's updates (32-bit words; coordinates may move up to 4 per round).
DEFAULT_FIXED_POINT = fixedpoint.FixedPoint(bits=32, max_abs=4.0)

#: Largest masked-input payload a party reads (a 3D nnU-Net in uint32 is about 70 MiB).
MAX_MASKED_BYTES = 2 << 30


def session_params(config: FederationConfig, session: str) -> secagg.SessionParams:
    """A session's parameters from ``federation.json``: every site takes part; ``options``
    may set ``secagg_degree`` (SecAgg+ neighbours) and ``secagg_threshold``."""
    opts = config.options or {}
    return secagg.SessionParams.make(session, config.site_names, degree=opts.get("secagg_degree"),
                                     threshold=opts.get("secagg_threshold"), graph_seed=config.seed)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` durably and atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


_WORDS = {"U32": np.uint32, "U64": np.uint64}


def decode_masked(data: bytes, where: str) -> dict[str, np.ndarray]:
    """A masked input's safetensors bytes as read-only uint32/uint64 arrays viewing ``data``
    (no copy); ValidationError naming ``where`` unless the header is well formed and its byte
    ranges tile the data exactly."""
    from ..protocol.documents import loads_strict

    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < n <= 16 << 20 or 8 + n > len(data):
        raise ValidationError(f"{where}: not a safetensors payload (header length {n})")
    header = loads_strict(data[8:8 + n], where)
    if not isinstance(header, dict):
        raise ValidationError(f"{where}: safetensors header is not an object")
    header.pop("__metadata__", None)
    start, arrays, spans = 8 + n, {}, []
    for name, e in header.items():
        ok = (isinstance(e, dict) and set(e) == {"dtype", "shape", "data_offsets"} and e["dtype"] in _WORDS
              and isinstance(e["shape"], list) and len(e["shape"]) <= 8
              and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in e["shape"])
              and isinstance(e["data_offsets"], list) and len(e["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in e["data_offsets"]))
        if not ok:
            raise ValidationError(f"{where}: tensor {name[:60]!r} is not a uint32/uint64 entry")
        dtype = np.dtype(_WORDS[e["dtype"]])
        count = int(np.prod(e["shape"], dtype=np.int64)) if e["shape"] else 1
        a, b = e["data_offsets"]
        if b - a != count * dtype.itemsize:
            raise ValidationError(f"{where}: tensor {name[:60]!r} has {b - a} bytes for {count} words")
        spans.append((a, b))
        arrays[name] = np.frombuffer(data, dtype, count, start + a).reshape(e["shape"])
    pos = 0
    for a, b in sorted(spans):
        if a != pos:
            raise ValidationError(f"{where}: tensor byte ranges do not tile the payload")
        pos = b
    if start + pos != len(data):
        raise ValidationError(f"{where}: tensor byte ranges do not tile the payload")
    return arrays


def _load_masked(bucket: Bucket, doc: SecAggMasked, cache: Path | None = None) -> dict[str, np.ndarray]:
    """A masked input, verified (size, sha256, safetensors, layout). With ``cache`` the verified
    payload is kept there (by sha256), so the sum reads what was checked when the masked roster
    was closed, whatever happens to the bucket's copy after."""
    doc.blob.validate(doc.blob.key)  # its sha256 names the cached file: hex only
    if doc.blob.size > MAX_MASKED_BYTES:
        raise ValidationError(f"{doc.blob.key}: manifest says {doc.blob.size} bytes, over the "
                              f"{MAX_MASKED_BYTES}-byte limit", key=doc.blob.key)
    if cache is None:
        data = bucket.get_blob_bytes(doc.blob, max_size=MAX_MASKED_BYTES)
    else:
        path = cache / f"{doc.blob.sha256}.safetensors"
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.incomplete")
            bucket.get_blob_file(doc.blob, str(tmp))
            os.replace(tmp, path)
        data = path.read_bytes()
    arrays = decode_masked(data, doc.blob.key)
    if secagg.layout_digest(arrays) != doc.layout:
        raise ValidationError(f"{doc.blob.key}: tensors do not match the layout its manifest names", key=doc.blob.key)
    return arrays


class _Party:
    def __init__(self, bucket: Bucket, params: secagg.SessionParams) -> None:
        self.bucket, self.params = bucket, params
        self.rejected: dict[str, str] = {}  # key -> reason: documents read and refused

    def _read(self, key: str, cls: type[Any]) -> Any | None:
        """The verified document at ``key`` (None if absent, or refused: then recorded)."""
        try:
            signed = self.bucket.read_optional(key, cls)
        except ValidationError as exc:
            self.rejected[key] = str(exc)
            return None
        if signed is None:
            return None
        if signed.doc.session != self.params.session:
            self.rejected[key] = f"{key}: belongs to session {signed.doc.session!r} (replayed?)"
            return None
        return signed.doc

    def _roster(self, stage: str) -> SecAggRoster | None:
        return self._read(roster_key(self.params.session, stage), SecAggRoster)

    def _docs(self, stage: str, cls: type[Any], sites: list[str] | tuple[str, ...]) -> dict[str, Any]:
        out = {}
        for s in sites:
            doc = self._read(site_stage_key(s, self.params.session, stage), cls)
            if doc is not None:
                out[s] = doc
        return out


class SecureSite(_Party):
    """One site's side of one session."""

    def __init__(self, bucket: Bucket, identity: Identity, workdir: str | os.PathLike[str],
                 params: secagg.SessionParams) -> None:
        super().__init__(bucket, params)
        if identity.role != "site" or identity.name not in params.sites:
            raise ValidationError(f"{identity.name!r} is not a site of session {params.session}")
        self.identity, self.name = identity, identity.name
        self.dir = Path(workdir) / "secagg" / params.session
        self._keys_checked = False

    def _check_own_keys(self, sec: secagg.SiteSecrets) -> None:
        """Our published keys must be those of our secrets: a wiped workdir would otherwise mask
        with keys no one can match, and the sum would be garbage."""
        mine = self._read(self._key("keys"), SecAggKeys)
        if mine != secagg.advertise(sec):
            raise Conflict(f"{self.bucket.store.describe(self._key('keys'))}: published with different content: "
                           f"these are not the keys of the secrets in {self.dir} (its state was lost or "
                           f"replaced), so {self.name} cannot take part in session {self.params.session}; "
                           "it will in the next one", key=self._key("keys"))
        self._keys_checked = True

    def secrets(self) -> secagg.SiteSecrets:
        """The session's secrets: made and persisted on first use, read back after."""
        path = self.dir / "secrets.json"
        if path.exists():
            s = secagg.SiteSecrets.from_json(path.read_bytes())
            if (s.session, s.site) != (self.params.session, self.name):
                raise FedfsError(f"{path}: holds the secrets of {s.site} in session {s.session}")
            return s
        s = secagg.SiteSecrets.new(self.params.session, self.name)
        _write_private(path, s.to_json())
        return s

    def _key(self, stage: str) -> str:
        return site_stage_key(self.name, self.params.session, stage)

    def _publish(self, stage: str, doc: Document) -> None:
        self.bucket.publish(self._key(stage), doc, self.identity)

    def step(self, inputs: Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]] | None = None) -> str:
        """Do the next due stage. ``inputs``: this site's input (or a callable giving it), needed
        when the masked stage is due; the same input on every re-run."""
        exists = self.bucket.store.exists
        if exists(self._key("unmask")):
            return "done"  # nothing left to do, and the secrets may already be forgotten
        sec = self.secrets()
        if not exists(self._key("keys")):
            self._publish("keys", secagg.advertise(sec))
            return "advertised"
        if not self._keys_checked:
            self._check_own_keys(sec)
        r_keys = self._roster("keys")
        if r_keys is None:
            return "waiting"
        if self.name not in r_keys.sites:
            return "excluded"
        if not exists(self._key("shares")):
            keys = self._docs("keys", SecAggKeys, [j for j in self.params.neighbours(self.name) if j in r_keys.sites])
            self._publish("shares", secagg.share_keys(self.params, sec, r_keys, keys))
            return "shared"
        r_shares = self._roster("shares")
        if r_shares is None:
            return "waiting"
        if self.name not in r_shares.sites:
            return "excluded"
        if not exists(self._key("masked")):
            if inputs is None:
                return "waiting for input"
            data = inputs() if callable(inputs) else inputs
            peers = [j for j in self.params.neighbours(self.name) if j in r_shares.sites]
            keys = self._docs("keys", SecAggKeys, peers)
            masked = secagg.mask_input(self.params, sec, r_shares, keys, data, keys_roster=r_keys)
            from safetensors.numpy import save

            blob = self.bucket.put_blob_bytes(lambda sha, ext: proto_layout.site_blob(self.name, sha, ext),
                                              save(masked))
            self._publish("masked", SecAggMasked(site=self.name, session=self.params.session,
                                                 roster=digest(r_shares), blob=blob,
                                                 layout=secagg.layout_digest(masked)))
            return "masked"
        r_masked = self._roster("masked")
        if r_masked is None:
            return "waiting"
        if self.name in r_masked.rejected:  # our masked input was refused (the reason is signed): a dropout
            self.rejected[self._key("masked")] = f"refused by the aggregator: {r_masked.rejected[self.name]}"
            return "excluded"
        return self._unmask(sec, r_shares, r_masked)

    def _unmask(self, sec: secagg.SiteSecrets, r_shares: SecAggRoster, r_masked: SecAggRoster) -> str:
        answered_path = self.dir / "answered.json"
        answered = json.loads(answered_path.read_bytes())["roster"] if answered_path.exists() else None
        peers = [j for j in self.params.neighbours(self.name) if j in r_shares.sites]
        keys = self._docs("keys", SecAggKeys, peers)
        shares = self._docs("shares", SecAggShares, peers)
        received = {}
        for j, doc in shares.items():  # one unreadable message costs its sender's share, not the round
            try:
                received.update(secagg.receive_shares(self.params, sec, keys, {j: doc}))
            except ValidationError as exc:
                self.rejected[site_stage_key(j, self.params.session, "shares")] = str(exc)

        def masked_exists(site: str) -> bool:
            try:  # sites need not read each other's folders (docs/operations.md): then it cannot tell
                doc = self._read(site_stage_key(site, self.params.session, "masked"), SecAggMasked)
            except StoreError:
                return False
            return doc is not None and doc.roster == digest(r_shares)

        doc = secagg.unmask_shares(self.params, sec, r_shares, r_masked, received, answered, masked_exists)
        _write_private(answered_path, json.dumps({"roster": doc.roster}).encode())
        self._publish("unmask", doc)
        return "unmasked"

    def forget(self) -> None:
        """Delete the session's secrets (call once the round's global is out): a later theft of
        the workdir then reveals nothing about this session's masks."""
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


class SecureAggregator(_Party):
    """The aggregator's side of one session: three rosters, then the unmasked sum."""

    def __init__(self, bucket: Bucket, identity: Identity, params: secagg.SessionParams,
                 layout: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
                 cache: str | os.PathLike[str] | None = None) -> None:
        super().__init__(bucket, params)
        if identity.role != "aggregator":
            raise ValidationError(f"{identity.name!r} is not the aggregator")
        self.identity, self.layout = identity, layout
        self.cache = None if cache is None else Path(cache)  # verified masked inputs, from roster to sum
        self.result: dict[str, np.ndarray] | None = None
        self.survivors: list[str] = []
        self.dropped: list[str] = []
        self.refused: dict[str, str] = {}  # dropouts whose masked input was refused, and why

    def _close(self, stage: str, present: list[str], previous: SecAggRoster | None,
               refused: Mapping[str, str] | None = None) -> SecAggRoster:
        roster = secagg.make_roster(self.params, stage, present, previous, refused)
        return self.bucket.publish(roster_key(self.params.session, stage), roster, self.identity).doc

    def _verify_masked(self, docs: dict[str, SecAggMasked]) -> dict[str, str]:
        """Read and check every masked input before the masked roster names its survivors (after
        it, a survivor can no longer be left out: its neighbours reveal its self-mask shares).
        site -> why its input is refused: unreadable, altered, malformed, or (without an expected
        layout) a tensor layout other than most sites'. One payload in memory at a time."""
        refused, layouts = {}, {}
        for s, doc in sorted(docs.items()):
            key = site_stage_key(s, self.params.session, "masked")
            try:
                arrays = _load_masked(self.bucket, doc, self.cache)
                layouts[s] = secagg.layout_digest(arrays)
                del arrays
            except (ValidationError, NotFound) as exc:
                refused[s] = f"masked input {doc.blob.key} refused: {exc}"
                self.rejected[key] = f"{refused[s]}; {s} is treated as dropped in session {self.params.session}"
        if self.layout is None and layouts:
            counts: dict[str, int] = {}
            for d in layouts.values():
                counts[d] = counts.get(d, 0) + 1
            want = min(counts, key=lambda d: (-counts[d], d))
            for s, d in sorted(layouts.items()):
                if d != want:
                    refused[s] = (f"masked input {docs[s].blob.key} refused: its tensor layout differs from the "
                                  "other sites'")
                    self.rejected[site_stage_key(s, self.params.session, "masked")] = (
                        f"{refused[s]}; {s} is treated as dropped in session {self.params.session}")
        return refused

    def step(self, close: bool = False) -> str:
        """Publish the next roster once every expected site did its stage (or, with ``close``,
        the caller's deadline passed, with whoever did); then unmask. ``done`` sets ``result``."""
        if self.result is not None:
            return "done"
        exists, session = self.bucket.store.exists, self.params.session
        previous = None
        for stage, cls in (("keys", SecAggKeys), ("shares", SecAggShares), ("masked", SecAggMasked)):
            roster = self._roster(stage)
            if roster is not None:
                previous = roster
                continue
            expected = list(self.params.sites) if previous is None else previous.sites
            if not close and not all(exists(site_stage_key(s, session, stage)) for s in expected):
                return "waiting"
            docs = self._docs(stage, cls, expected)
            if previous is not None:
                docs = {s: d for s, d in docs.items() if d.roster == digest(previous)}
            refused: dict[str, str] = {}
            if stage == "masked":
                if self.layout is not None:
                    want = secagg.layout_digest({n: np.empty(shape, dt) for n, (shape, dt) in self.layout.items()})
                    for s in sorted(d for d in docs if docs[d].layout != want):
                        refused[s] = f"masked input {docs[s].blob.key} refused: its layout is not the session's"
                        self.rejected[site_stage_key(s, session, "masked")] = refused[s]
                refused.update(self._verify_masked({s: d for s, d in docs.items() if s not in refused}))
            self._close(stage, sorted(docs), previous, refused)
            return f"roster {stage}"
        return self._finish(previous, close)

    def _finish(self, r_masked: SecAggRoster, close: bool) -> str:
        survivors = r_masked.sites
        unmasks = {s: d for s, d in self._docs("unmask", SecAggUnmask, survivors).items()
                   if d.roster == digest(r_masked)}
        if len(unmasks) < len(survivors):
            t = self.params.threshold
            enough = all(sum(s in u.self_shares for u in unmasks.values()) >= t for s in survivors) and all(
                sum(d in u.key_shares for u in unmasks.values()) >= t for d in r_masked.dropped)
            if not (close and enough):
                return "waiting"
        keys = self._docs("keys", SecAggKeys, sorted(set(survivors) | set(r_masked.dropped)))
        masked_docs = self._docs("masked", SecAggMasked, survivors)
        if sorted(masked_docs) != survivors:
            raise ValidationError(f"session {self.params.session}: a survivor's masked input is no longer readable: "
                                  f"{sorted(set(survivors) - set(masked_docs))}")
        total = None
        for s in survivors:  # one payload in memory at a time
            try:
                arrays = _load_masked(self.bucket, masked_docs[s], self.cache)
            except (ValidationError, NotFound) as exc:  # checked at the masked roster; altered since, and no cache
                raise ValidationError(f"session {self.params.session}: {s}'s masked input, checked when the masked "
                                      f"roster was closed, is now refused ({exc}); {s} can no longer be left out "
                                      "(its neighbours revealed its self-mask shares), so the session cannot "
                                      "finish", key=masked_docs[s].blob.key) from None
            total = secagg.add_masked(total, arrays)
        self.result = secagg.remove_masks(self.params, keys, r_masked, total, unmasks)
        self.survivors, self.dropped = list(survivors), list(r_masked.dropped)
        self.refused = dict(r_masked.rejected)
        return "done"


def round_session(base_version: int) -> str:
    """The session of the synchronous round trained from global ``base_version``: ``v000003``."""
    return f"v{base_version:06d}"


def _fixed_point(config: FederationConfig) -> fixedpoint.FixedPoint:
    opts = config.options or {}
    return fixedpoint.FixedPoint(bits=32, max_abs=float(opts.get("secagg_max_abs", DEFAULT_FIXED_POINT.max_abs)))


def site_round_step(bucket: Bucket, identity: Identity, workdir: str | os.PathLike[str], base_version: int, *,
                    global_path: str | None = None, update_path: str | None = None, weight: int = 1,
                    weight_total: int = 1) -> str:
    """One step of a site's secure round from global ``base_version`` (the site role calls it
    until ``done``): without ``update_path`` it advertises and shares ahead of training; with it
    (and the global it trained from) it masks and publishes the update, then unmasks."""
    from safetensors.numpy import load_file

    assert bucket.config is not None
    site = SecureSite(bucket, identity, workdir, session_params(bucket.config, round_session(base_version)))
    inputs = None
    if update_path is not None and global_path is not None:
        def inputs() -> Mapping[str, np.ndarray]:
            return fixedpoint.encode_update(load_file(update_path), load_file(global_path), weight, weight_total,
                                            _fixed_point(bucket.config))
    return site.step(inputs)


def aggregator_round_step(bucket: Bucket, identity: Identity, base_version: int, *, global_path: str,
                          weight_total: int, close: bool = False, cache: str | os.PathLike[str] | None = None
                          ) -> tuple[str, dict[str, np.ndarray] | None, Any]:
    """One step of the aggregator's secure round from global ``base_version``: (what it did, the
    survivors' weighted mean when ``done`` else None, the aggregator object: ``survivors``,
    ``dropped``, ``rejected``). ``close``: the round's deadline passed; close the current stage
    with whoever is in. ``cache``: where the masked inputs verified at the masked roster are kept."""
    from safetensors.numpy import load_file

    assert bucket.config is not None
    agg = SecureAggregator(bucket, identity, session_params(bucket.config, round_session(base_version)),
                           cache=cache)
    what = agg.step(close=close)
    while what.startswith("roster") and not close:  # rosters due now; a deadline closes one stage a step
        after = agg.step()
        if after == "waiting":
            break
        what = after
    if what != "done":
        return what, None, agg
    assert agg.result is not None
    mean, _ = fixedpoint.decode_mean(agg.result, load_file(global_path), weight_total, _fixed_point(bucket.config))
    return what, mean, agg


def run_session(sites: Mapping[str, SecureSite], aggregator: SecureAggregator,
                inputs: Mapping[str, Any], *, stop_after: Mapping[str, str] | None = None,
                max_passes: int = 40) -> dict[str, np.ndarray]:
    """Drive one session in process (tests, benchmarks, simulations): every site steps until it
    waits; the aggregator steps, closing a stage with whoever is there once no site moves.
    ``stop_after``: site -> the step result after which that site is killed (drops out)."""
    stop_after = dict(stop_after or {})
    alive = set(sites)
    for _ in range(max_passes):
        moved = False
        for name in sorted(alive):
            while True:
                what = sites[name].step(inputs.get(name))
                if what in ("waiting", "waiting for input", "done", "excluded"):
                    break
                moved = True
                if stop_after.get(name) == what:
                    alive.discard(name)
                    break
        what = aggregator.step(close=not moved)
        if what == "done":
            assert aggregator.result is not None
            return aggregator.result
    raise FedfsError(f"session {aggregator.params.session} did not finish in {max_passes} passes")
