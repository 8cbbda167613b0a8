"""Scripted rounds from Python, for any PyTorch model (no nnU-Net needed).

The same objects the CLI uses, one level up: a :class:`SiteClient` joins a
federation with a model, pulls the newest global into it, and pushes an update
after local training; the coordinator drives an :class:`~fedfs.roles.aggregator.Aggregator`.
Use a federation created with ``mode="fedavg"`` (one architecture, every tensor
averaged) or ``mode="asym"`` (site-specific architectures, matching tensors
averaged)::

    from fedfs import Federation
    from fedfs.roles.client import SiteClient

    fed = Federation.open("/mnt/share/fed", identity="keys/A.key")
    client = SiteClient(fed, workdir="work/A")
    client.join(model, num_cases=120)            # declares the architecture (initial weights)
    for _ in range(fed.config.rounds):
        version = client.pull(model)             # waits for a global newer than the last one used
        train(model)                             # your own loop
        client.push(model, num_cases=120, metrics={"loss": 0.31})
    client.pull(model, final=True)               # the final global

Every document is signed with the site's key; every global is verified
(signature, sha256, dtypes, shapes, finite values) before it touches the model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..protocol import layout
from ..fl.plans import plans_digest
from ..errors import ConfigError
from ..protocol.schema import GlobalManifest, PlansDocument, UpdateManifest
from .context import FederationContext

__all__ = ["SiteClient"]


def _architecture(tensors: dict[str, Any]) -> dict[str, Any]:
    return {k: [str(t.dtype).replace("torch.", ""), list(t.shape)] for k, t in sorted(tensors.items())}


class SiteClient:
    """A site driven from Python: join, pull, push."""

    def __init__(self, fed: FederationContext, workdir: str | os.PathLike[str]) -> None:
        self.fed = fed
        self.identity = fed.require_identity("site")
        self.name = self.identity.name
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.last_version: int | None = None
        self.digest = ""
        fed.store.check_exclusive(layout.site_prefix(self.name) + "doctor")  # write-once needs put-if-absent
        if fed.config.mode == "ffe":
            raise ConfigError("mode 'ffe' needs nnU-Net's fingerprint phase: use `fedfs site` for nnU-Net, "
                              "or a federation created with mode 'fedavg' or 'asym' for plain PyTorch models")

    def join(self, model: Any, *, num_cases: int, description: str = "") -> None:
        """Publish this site's architecture and initial weights (idempotent)."""
        from ..weights.tensors import canonical_state, save_weights

        state = canonical_state(model)
        arch = _architecture(state)
        self.digest = plans_digest(arch)
        key = layout.site_plans(self.name)
        if self.fed.store.exists(key):
            existing = self.fed.bucket.read(key, PlansDocument).doc
            if existing.digest != self.digest:
                raise ConfigError(f"{key}: this site joined with another architecture ({existing.digest[:12]})")
            return
        init = self.dir / "init.safetensors"
        save_weights(init, state, {"kind": "initial", "site": self.name})
        ref = self.fed.bucket.put_blob_file(lambda sha, ext: layout.site_blob(self.name, sha, ext), str(init))
        summary = {"description": description, "tensors": len(state), "params": sum(t.numel() for t in state.values()),
                   "num_cases": num_cases}
        self.fed.bucket.publish(key, PlansDocument(site=self.name, plans_identifier="pytorch",
                                                   configuration=self.fed.config.configuration, digest=self.digest,
                                                   summary=summary, init_blob=ref), self.identity)

    def latest(self) -> GlobalManifest | None:
        """The newest global manifest (verified), or None before v0."""
        v = self.fed.bucket.latest_version()
        return None if v is None else self.fed.bucket.read(layout.global_version(v), GlobalManifest).doc

    @property
    def finished(self) -> bool:
        m = self.latest()
        return bool(m and m.is_final(self.fed.config.rounds))

    def pull(self, model: Any = None, *, final: bool = False, timeout: float = 3600.0,
             poll_interval: float = 1.0) -> int:
        """Wait for a global newer than the last one pulled (or the final one), verify it, load
        it into ``model`` (tensors this model has, with matching shapes) and return its version."""
        from ..weights.tensors import load_weights

        deadline = time.monotonic() + timeout
        while True:
            m = self.latest()
            done = m is not None and m.is_final(self.fed.config.rounds)
            if m is not None and (done if final else (self.last_version is None or m.version > self.last_version)):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {'final' if final else 'new'} global within {timeout:.0f} s")
            time.sleep(poll_interval)
        ref = m.blob_for(self.name)
        path = self.dir / f"global-v{m.version:06d}.safetensors"
        if not path.exists():
            self.fed.bucket.get_blob_file(ref, str(path))
        tensors, _ = load_weights(path)
        if model is not None:
            import torch

            own = dict(model.named_parameters())
            own.update(model.named_buffers())
            with torch.no_grad():
                for k, t in tensors.items():
                    if k in own and tuple(own[k].shape) == tuple(t.shape):
                        own[k].copy_(t)
        self.last_version = m.version
        return m.version

    def next_round(self) -> int:
        r = 0
        prefix = layout.site_updates_prefix(self.name)
        for key in self.fed.store.list(prefix):
            parsed = layout.parse_update_key(key)
            if parsed:
                r = max(r, parsed[1] + 1)
        return r

    def push(self, model: Any, *, num_cases: int, metrics: dict[str, float] | None = None,
             base_version: int | None = None) -> UpdateManifest:
        """Publish the model as this site's next update, trained from ``base_version``
        (default: the version last pulled)."""
        from ..weights.tensors import canonical_state, save_weights

        base = self.last_version if base_version is None else base_version
        if base is None:
            raise ConfigError("pull a global before pushing an update (or give base_version)")
        r = self.next_round()
        path = self.dir / f"update-r{r:06d}.safetensors"
        save_weights(path, canonical_state(model), {"kind": "update", "site": self.name, "base_version": str(base)})
        ref = self.fed.bucket.put_blob_file(lambda sha, ext: layout.site_blob(self.name, sha, ext), str(path))
        doc = UpdateManifest(site=self.name, round=r, base_version=base, blob=ref, num_cases=num_cases,
                             plans_digest=self.digest, metrics={k: float(v) for k, v in (metrics or {}).items()})
        self.fed.bucket.publish(layout.site_update(self.name, r), doc, self.identity)
        from .site import drop_marker

        drop_marker(self.fed.store, self.name, r)
        return doc
