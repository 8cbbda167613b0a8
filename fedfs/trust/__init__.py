"""Identities and trust: Ed25519 keys, the signed envelope, and the verified bucket
(signed documents and content-addressed blobs over a :class:`~fedfs.store.Store`)."""
