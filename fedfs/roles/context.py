"""What a role needs of its federation, as a protocol: the roles never import the facade.

:class:`fedfs.federation.Federation` satisfies :class:`FederationContext`; so does any
object with the same attributes (a test double, a federation opened another way). The
facade sits above the roles and builds them (``Federation.site()``, ``.aggregator()``).
"""

from __future__ import annotations

from typing import Protocol

from ..protocol.schema import FederationConfig
from ..store import Store
from ..trust.bucket import Bucket
from ..trust.signing import Identity

__all__ = ["FederationContext"]


class FederationContext(Protocol):
    """A verified federation on one bucket, acting as (at most) one party."""

    store: Store  # the backend the bucket lives on
    config: FederationConfig  # the verified federation.json
    bucket: Bucket  # signed documents and verified blobs over ``store``
    digest: str  # sha256 of federation.json
    identity: Identity | None  # the party's private key, if any

    def require_identity(self, role: str) -> Identity:
        """The party's identity; raise ConfigError unless it has ``role``."""
        ...
