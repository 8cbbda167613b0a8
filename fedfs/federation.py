"""The :class:`Federation` object: a bucket URL, its verified ``federation.json``, and a party.

This is the entry point of the Python API and what every CLI command uses::

    from fedfs import Federation
    fed = Federation.open("s3://bucket/fed1", identity="keys/A.key")
    fed.config.site_names            # ['A', 'B', 'C']

``federation.json`` is the trust root. It is written once by ``fedfs init``,
signed by the aggregator key it lists; a party may pin its sha256
(``--federation-digest`` / ``FEDFS_FEDERATION_DIGEST``) so that a bucket
administrator cannot swap the federation under it.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import replace
from typing import Any

from .protocol import layout
from .trust.bucket import Bucket
from .protocol.documents import canonical_json, loads_strict
from .errors import ConfigError, Conflict, IntegrityError, NotFound, SchemaError
from .protocol.schema import FederationConfig, Party, check_configuration
from .trust.signing import Identity, load_identity, parse_envelope, parse_public_key, read_public_key_file, utcnow, verify_envelope
from .store import Store, open_store

MAX_FEDERATION_BYTES = 1024 * 1024


class Federation:
    """A federation on one bucket, optionally acting as one of its parties."""

    def __init__(self, store: Store, config: FederationConfig, digest: str, identity: Identity | None = None):
        self.store = store
        self.config = config
        self.digest = digest
        self.bucket = Bucket(store, config)
        self.identity = identity
        if identity is not None:
            self._check_identity(identity)

    # ---- opening --------------------------------------------------------------
    @classmethod
    def open(
        cls,
        url: str | Store,
        *,
        storage_options: dict[str, Any] | None = None,
        identity: Identity | str | os.PathLike[str] | None = None,
        pin: str | None = None,
    ) -> Federation:
        """Open the federation at ``url``; verify ``federation.json`` (and ``pin``, its sha256).

        Opening creates nothing (a mistyped folder is not made); a missing bucket or folder is
        named as such, not as a missing federation."""
        store = url if isinstance(url, Store) else open_store(url, storage_options, create=False)
        where = store.describe(layout.FEDERATION)
        try:
            data = store.read_bytes(layout.FEDERATION, max_size=MAX_FEDERATION_BYTES)
        except NotFound:
            raise NotFound(store.missing_root() or f"{where}: no federation here; run `fedfs init` first") from None
        digest = hashlib.sha256(data).hexdigest()
        if pin and pin != digest:
            raise IntegrityError(f"{where}: sha256 {digest} differs from the pinned {pin} (federation replaced?)")
        env = parse_envelope(loads_strict(data, where), where)
        config = FederationConfig.from_dict(env["body"], where)
        if env["signer"] != config.aggregator.name or env["role"] != "aggregator":
            raise SchemaError(f"{where}: must be signed by its aggregator {config.aggregator.name!r}")
        verify_envelope(env, parse_public_key(config.aggregator.public_key, where), where)
        if isinstance(identity, (str, os.PathLike)):
            identity = load_identity(identity)
        return cls(store, config, digest, identity)

    @classmethod
    def create(
        cls,
        url: str | Store,
        config: FederationConfig,
        identity: Identity,
        *,
        storage_options: dict[str, Any] | None = None,
        pretrained_weights: str | os.PathLike[str] | None = None,
    ) -> tuple[Federation, bool]:
        """Write ``federation.json`` once. Returns (federation, created).

        A second call with the same settings returns the existing federation
        (``created`` False); with different settings it raises Conflict naming them.
        ``pretrained_weights`` (an nnU-Net checkpoint, model folder or safetensors, read here)
        is converted to safetensors, stored as the aggregator's blob (payload first) and named in
        ``federation.json``; sites start from it (docs/nnunet.md, Pretrained weights).
        """
        store = url if isinstance(url, Store) else open_store(url, storage_options)
        store.check_exclusive("doctor")  # before anything is written: write-once files need put-if-absent
        if identity.role != "aggregator" or identity.name != config.aggregator.name:
            raise ConfigError(f"federation.json must be signed with the aggregator's key ({config.aggregator.name}.key)")
        if identity.public_key_b64 != config.aggregator.public_key:
            raise ConfigError("the aggregator key does not match the aggregator public key in the configuration")
        if not config.federation_id:
            config = replace(config, federation_id=uuid.uuid4().hex)
        if not config.created:
            config = replace(config, created=utcnow())
        config.validate(store.describe(layout.FEDERATION))
        check_trainable(config)
        if pretrained_weights is not None:  # the payload before the document that names it
            config = replace(config, pretrained_weights=_publish_pretrained(store, config, pretrained_weights))
        data = canonical_json(identity.sign(config.to_dict()))
        try:
            store.publish(layout.FEDERATION, data)
            return cls.open(store, identity=identity), True
        except Conflict:
            existing = cls.open(store, identity=identity)
            diffs = _config_differences(existing.config, config)
            if diffs:
                raise Conflict(
                    f"{store.describe(layout.FEDERATION)}: a different federation already exists here "
                    f"(differs in {', '.join(diffs)}); use a new bucket prefix"
                ) from None
            return existing, False

    def as_party(self, identity: Identity | str | os.PathLike[str]) -> Federation:
        """This federation, acting as the party whose private key is ``identity``."""
        if not isinstance(identity, Identity):
            identity = load_identity(identity)
        return Federation(self.store, self.config, self.digest, identity)

    def _check_identity(self, identity: Identity) -> None:
        party = self.config.party(identity.name)
        if party is None:
            raise ConfigError(f"{identity.name!r} is not a member of this federation ({self.store.url})")
        if party.role != identity.role:
            raise ConfigError(f"key {identity.name!r} has role {identity.role!r}, federation.json says {party.role!r}")
        if party.public_key != identity.public_key_b64:
            raise ConfigError(f"the private key for {identity.name!r} does not match its public key in federation.json")

    # ---- the roles, as the CLI builds them ------------------------------------------
    def aggregator(self, workdir: str | os.PathLike[str]):
        """This federation's :class:`~fedfs.roles.aggregator.Aggregator` (needs the aggregator's key)."""
        from .roles.aggregator import Aggregator

        return Aggregator(self, workdir)

    def site(self, work: Any, workdir: str | os.PathLike[str]):
        """A :class:`~fedfs.roles.site.Site` doing ``work`` (e.g. :class:`~fedfs.nnunet.work.NnunetWork`)."""
        from .roles.site import Site

        settle = getattr(work, "settle", None)  # NnunetWork: take federation.json's planner, plans, ...
        if callable(settle):
            settle(self)
        return Site(self, work, workdir)

    def site_client(self, workdir: str | os.PathLike[str]):
        """A :class:`~fedfs.roles.client.SiteClient` for scripted rounds with any PyTorch model."""
        from .roles.client import SiteClient

        return SiteClient(self, workdir)

    def require_identity(self, role: str) -> Identity:
        if self.identity is None:
            raise ConfigError(f"this step needs the {role}'s private key (--key or FEDFS_KEY)")
        if self.identity.role != role:
            raise ConfigError(f"this step is for the {role}, but the key is {self.identity.role} {self.identity.name!r}")
        return self.identity

    def __repr__(self) -> str:
        return f"Federation({self.store.url!r}, mode={self.config.mode!r}, sites={self.config.site_names})"


def _publish_pretrained(store: Store, config: FederationConfig, path: str | os.PathLike[str]):
    """Convert ``path`` locally to safetensors and store it content-addressed; return its BlobRef."""
    import tempfile

    from .nnunet.pretrained import write_pretrained

    with tempfile.TemporaryDirectory(prefix="fedfs-pretrained-") as tmp:
        out = os.path.join(tmp, "pretrained.safetensors")
        write_pretrained(path, out)
        return Bucket(store, config).put_blob_file(layout.aggregator_blob, out)


def parse_folds(text: str) -> list[str]:
    """``--folds``: ``0,1,2,3,4``, a range ``0-4``, or ``all`` (nnU-Net's fold that trains every case);
    ConfigError otherwise."""
    from .protocol.schema import FOLDS

    folds: list[str] = []
    for part in (p.strip() for p in str(text).split(",")):
        if "-" in part and all(x.strip().isdigit() for x in part.split("-", 1)):
            lo, hi = (int(x) for x in part.split("-", 1))
            folds += [str(i) for i in range(lo, hi + 1)]
        elif part:
            folds.append(part)
    bad = [f for f in folds if f not in FOLDS]
    if bad or not folds or len(set(folds)) != len(folds):
        raise ConfigError(f"--folds {text!r}: give distinct folds among {', '.join(FOLDS)} (e.g. 0-4, 0,2 or all)")
    return folds


def fold_url(url: str, fold: str) -> str:
    """Where the federation of one fold lives when one ``fedfs init --folds`` makes several: ``URL/fold_K``."""
    return url.rstrip("/") + f"/fold_{fold}"


def create_folds(url: str, config: FederationConfig, identity: Identity, folds: list[str], *,
                 storage_options: dict[str, Any] | None = None,
                 pretrained_weights: str | os.PathLike[str] | None = None) -> list[tuple[str, Federation, bool]]:
    """One federation per fold, sharing every other setting: at ``url`` itself for a single fold, else at
    ``URL/fold_K`` (:func:`fold_url`). Returns (fold, federation, created) for each. The folds' set-ups
    repeat the census, fingerprint and plans, which come out identical (sites skip preprocessing again)."""
    out = []
    for f in folds:
        target = url if len(folds) == 1 else fold_url(url, f)
        fed, created = Federation.create(target, replace(config, fold=f), identity, storage_options=storage_options,
                                         pretrained_weights=pretrained_weights)
        out.append((f, fed, created))
    return out


def check_trainable(config: FederationConfig) -> None:
    """ConfigError for a federation fedfs cannot train: the cascade's configurations (docs/nnunet.md)."""
    from .protocol.schema import CASCADE_CONFIGURATIONS

    if config.configuration in CASCADE_CONFIGURATIONS:
        raise ConfigError(f"configuration {config.configuration!r} is not supported in a federation: "
                          f"{CASCADE_CONFIGURATIONS[config.configuration]}; train 3d_fullres or 2d "
                          "(docs/nnunet.md, Cascade)")


def derive_plans_identifier(planner: str, plans_identifier: str | None = None) -> str:
    """The plans identifier a federation with ``planner`` trains, as nnU-Net derives it: the one given
    (``-overwrite_plans_name``), else what the planner writes (schema.PLANNERS; for another planner,
    the default of its ``plans_name`` when nnU-Net is installed here). ConfigError when unknown."""
    from .protocol.schema import PLANNERS

    if plans_identifier:
        return plans_identifier
    if planner in PLANNERS:
        return PLANNERS[planner]
    try:
        from .nnunet.adapter import planner_plans_identifier

        return planner_plans_identifier(planner)
    except Exception as exc:  # noqa: BLE001 - nnU-Net absent here, or no such planner
        raise ConfigError(f"cannot tell which plans identifier planner {planner!r} writes ({exc}); give it "
                          "with -p/--plans-identifier") from None


def _config_differences(a: FederationConfig, b: FederationConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    ignore = {"federation_id", "created"}
    return sorted(k for k in set(da) | set(db) if k not in ignore and da.get(k) != db.get(k))


def config_from_key_dir(
    key_dir: str | os.PathLike[str],
    sites: list[str],
    *,
    aggregator: str | None = None,
    **settings: Any,
) -> tuple[FederationConfig, Identity]:
    """Build a configuration from ``NAME.pub`` files in ``key_dir``; return it and the aggregator's identity.

    The aggregator is the one ``*.key`` with role aggregator in ``key_dir``
    (or ``aggregator``). Every site needs ``SITE.pub`` there.
    """
    from pathlib import Path

    d = Path(key_dir)
    if not d.is_dir():
        raise ConfigError(f"{d}: key folder not found (create keys with `fedfs keygen`)")
    agg_identity = None
    candidates = [aggregator] if aggregator else [p.stem for p in sorted(d.glob("*.key"))]
    for name in candidates:
        path = d / f"{name}.key"
        if path.exists():
            ident = load_identity(path)
            if ident.role == "aggregator":
                agg_identity = ident
                break
    if agg_identity is None:
        raise ConfigError(f"{d}: no aggregator private key (run `fedfs keygen NAME --role aggregator -o {d}`)")
    parties = []
    for site in sites:
        layout.check_name(site)
        pub = d / f"{site}.pub"
        if not pub.exists():
            raise ConfigError(f"{pub}: missing public key for site {site!r} (the site runs `fedfs keygen {site}`)")
        key, role, name = read_public_key_file(pub)
        if role != "site" or name != site:
            raise ConfigError(f"{pub}: is a key for {role} {name!r}, not site {site!r}")
        parties.append(Party(name=site, role="site", public_key=key))
    delta = settings.pop("dp_delta", None)
    if settings.get("dp_epsilon"):  # DP-FedAvg: the noise multiplier that keeps the planned rounds in budget
        from .privacy.dp import DEFAULT_DELTA, noise_multiplier_for

        settings["dp_delta"] = DEFAULT_DELTA if delta is None else delta
        if not settings.get("dp_noise_multiplier"):
            settings["dp_noise_multiplier"] = noise_multiplier_for(settings["dp_epsilon"], settings["dp_delta"],
                                                                   settings.get("rounds", 5))
    elif delta:
        settings["dp_delta"] = delta  # without an epsilon: refused by FederationConfig.validate, with the reason
    configuration = check_configuration(settings.pop("configuration", "2d"),
                                        custom=settings.pop("custom_configuration", False))
    planner = settings.pop("planner", None) or "ExperimentPlanner"
    settings["plans_identifier"] = derive_plans_identifier(planner, settings.pop("plans_identifier", None))
    settings["planner"] = planner
    config = FederationConfig(
        federation_id=settings.pop("federation_id", ""),
        mode=settings.pop("mode", "ffe"),
        configuration=configuration,
        aggregator=Party(name=agg_identity.name, role="aggregator", public_key=agg_identity.public_key_b64),
        sites=parties,
        **settings,
    )
    return config, agg_identity
