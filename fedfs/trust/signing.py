"""Ed25519 identities and the signed envelope around every published document.

An envelope is JSON::

    {"envelope": "fedfs-signed-v1", "signer": "A", "role": "site",
     "writer_token": "[<installation>.]<uuid4 hex>", "signed_at": "2026-...Z",
     "body": {...document...}, "signature": "<base64 Ed25519>"}

The writer token is new for every envelope; a party that knows which installation it is
(:mod:`fedfs.roles.installation`) prefixes it with that installation's token, so a reader can
tell two machines signing with one key apart (:func:`installation_of`).

The signature covers ``b"fedfs-signed-v1\\n" + canonical_json(envelope without
"signature")``, so signer, role, token, time and body are all bound. A reader
checks the signature against the key ``federation.json`` lists for that signer
and that the signer has the role the key's location requires, before it looks
at the body. Private keys are PEM files on the party's own machine, never in
the bucket.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..protocol.documents import brief, canonical_json
from ..errors import ConfigError, SchemaError, SignatureError
from ..protocol.layout import check_name
from ..protocol.timestamps import utcnow

ENVELOPE = "fedfs-signed-v1"
_DOMAIN = ENVELOPE.encode() + b"\n"
_ENVELOPE_FIELDS = {"envelope", "signer", "role", "writer_token", "signed_at", "body", "signature"}
_MAX_ENVELOPE_STRING = 512  # names, tokens, stamps and a base64 signature are far shorter


@dataclass(frozen=True)
class Identity:
    """A party's private key and who it is. Load with :func:`load_identity`."""

    name: str
    role: str
    private_key: Ed25519PrivateKey
    installation: str = ""  # which machine signs (see the module doc); "" = not said

    @property
    def public_key_b64(self) -> str:
        return public_key_b64(self.private_key.public_key())

    def sign(self, body: dict[str, Any], *, writer_token: str | None = None) -> dict[str, Any]:
        """Wrap ``body`` in a signed envelope."""
        env = {
            "envelope": ENVELOPE,
            "signer": self.name,
            "role": self.role,
            "writer_token": writer_token or new_writer_token(self.installation),
            "signed_at": utcnow(),
            "body": body,
        }
        env["signature"] = base64.b64encode(self.private_key.sign(_DOMAIN + canonical_json(env))).decode()
        return env


def new_writer_token(installation: str = "") -> str:
    """A fresh writer token, ``<installation>.<uuid4 hex>`` when the installation is known."""
    return f"{installation}.{uuid.uuid4().hex}" if installation else uuid.uuid4().hex


def installation_of(writer_token: str) -> str | None:
    """The installation that wrote an envelope, from its writer token (None: not said)."""
    head, dot, _ = writer_token.rpartition(".")
    return head if dot and head else None


def public_key_b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: str, where: str) -> Ed25519PublicKey:
    """A base64 raw Ed25519 public key; anything else is a SchemaError naming ``where``."""
    if not isinstance(text, str) or len(text) > 64:
        raise SchemaError(f"{where}: not a base64 Ed25519 public key ({brief(text)})")
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise SchemaError(f"{where}: not a base64 Ed25519 public key ({exc})") from None


def generate_keypair(name: str, role: str, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``NAME.key`` (PEM, mode 0600) and ``NAME.pub`` (base64 raw + role) in ``out_dir``.

    Refuses to overwrite an existing key: losing a private key locks a party out.
    """
    check_name(name, "party name")
    if role not in ("site", "aggregator"):
        raise ConfigError(f"role must be 'site' or 'aggregator', got {role!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (key_path, pub_path):
        if p.exists():
            raise ConfigError(f"{p} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.write(f"# fedfs name={name} role={role}\n".encode())
    pub_path.write_text(f"{public_key_b64(key.public_key())} {role} {name}\n")
    return key_path, pub_path


def read_public_key_file(path: str | os.PathLike[str]) -> tuple[str, str, str]:
    """``NAME.pub`` -> (public_key_b64, role, name)."""
    parts = Path(path).read_text().split()
    if len(parts) != 3:
        raise ConfigError(f"{path}: expected 'KEY ROLE NAME' as written by `fedfs keygen`")
    key, role, name = parts
    parse_public_key(key, str(path))
    return key, role, check_name(name, "party name")


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Load a private key written by :func:`generate_keypair`."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read private key {p}: {exc.strerror}") from None
    if os.name == "posix" and p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"private key {p} is readable by group or others; run `chmod 600 {p}`")
    name = role = None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("# fedfs "):
            meta = dict(kv.split("=", 1) for kv in line[8:].split())
            name, role = meta.get("name"), meta.get("role")
    if not name or not role:
        raise ConfigError(f"{p}: not a fedfs key (missing '# fedfs name=... role=...' line)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{p}: cannot parse private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{p}: not an Ed25519 key")
    return Identity(name=name, role=role, private_key=key)


def parse_envelope(data: Any, where: str) -> dict[str, Any]:
    """Check the envelope's shape (not yet its signature); total: any parsed JSON either passes or
    is a SchemaError/SignatureError naming ``where``."""
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected a signed fedfs document (a JSON object)")
    if type(data.get("envelope")) is not str or data["envelope"] != ENVELOPE:
        raise SchemaError(f"{where}: not a signed fedfs document (envelope {brief(data.get('envelope'))})")
    missing = _ENVELOPE_FIELDS - set(data)
    if "signature" in missing:
        raise SignatureError(f"{where}: document is not signed")
    if missing:
        raise SchemaError(f"{where}: envelope is missing {', '.join(sorted(missing))}")
    extra = set(data) - _ENVELOPE_FIELDS
    if extra:
        raise SchemaError(f"{where}: envelope has unknown field(s) {', '.join(brief(k, 40) for k in sorted(extra)[:5])}")
    for f in ("signer", "role", "writer_token", "signed_at", "signature"):
        if not isinstance(data[f], str):
            raise SchemaError(f"{where}: envelope field {f!r} must be a string")
        if len(data[f]) > _MAX_ENVELOPE_STRING:
            raise SchemaError(f"{where}: envelope field {f!r} is {len(data[f])} characters (the limit is "
                              f"{_MAX_ENVELOPE_STRING})")
    if not isinstance(data["body"], dict):
        raise SchemaError(f"{where}: envelope body must be a JSON object")
    return data


def verify_envelope(env: dict[str, Any], public_key: Ed25519PublicKey, where: str) -> None:
    """Raise SignatureError unless ``env['signature']`` is valid for ``public_key``."""
    unsigned = {k: v for k, v in env.items() if k != "signature"}
    try:
        sig = base64.b64decode(env["signature"], validate=True)
        public_key.verify(sig, _DOMAIN + canonical_json(unsigned))
    except (InvalidSignature, binascii.Error, ValueError):
        raise SignatureError(f"{where}: signature by {env.get('signer')!r} does not verify (forged or altered)") from None
