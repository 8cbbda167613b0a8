"""Mask streams and the keys behind them: X25519 agreement, HKDF, ChaCha20, ChaCha20-Poly1305.

Only 32-byte seeds ever travel (inside Shamir shares); the masks themselves are expanded
locally from a seed with the ChaCha20 stream cipher, written straight into numpy buffers
(vectorised: one keystream call per tensor group, no Python loop over elements). A mask is
the keystream read as unsigned integers of the tensor's word size, so mask addition is
arithmetic modulo 2**32 or 2**64, which numpy's unsigned types do natively.

Every derived key is bound to the session and the ordered pair of parties (HKDF ``info``),
so one key encrypts one message and one seed masks one session.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..errors import SignatureError, ValidationError

__all__ = ["WORD_DTYPES", "public_key_of", "agree", "pairwise_seed", "share_key", "encrypt", "decrypt",
           "apply_mask", "b64", "unb64"]

#: The unsigned word types a masked tensor may use.
WORD_DTYPES = {"uint32": np.uint32, "uint64": np.uint64}
_NONCE = bytes(12)  # each AEAD key encrypts exactly one message (its info binds sender, receiver, session)
_CHUNK = 1 << 22  # keystream bytes per call
_ZEROS = memoryview(bytes(_CHUNK))  # ChaCha20 of zeros is the keystream itself


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object, where: str, size: int | None = None, limit: int = 1 << 20) -> bytes:
    """Base64 text as bytes (exactly ``size`` of them when given); ValidationError naming ``where``."""
    if not isinstance(text, str) or len(text) > 2 * limit:
        raise ValidationError(f"{where}: expected base64 text")
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValidationError(f"{where}: not valid base64") from None
    if size is not None and len(data) != size:
        raise ValidationError(f"{where}: expected {size} bytes, got {len(data)}")
    return data


def public_key_of(private: bytes) -> bytes:
    """The raw 32-byte X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes) -> bytes:
    """The X25519 shared secret of our private key and a peer's public key (symmetric)."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise ValidationError(f"unusable X25519 public key: {exc}") from None
    return shared


def _hkdf(secret: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"fedfs-secagg-v1", info=info.encode()).derive(secret)


def pairwise_seed(private: bytes, peer_public: bytes, session: str, a: str, b: str) -> bytes:
    """The mask seed two sites share in ``session`` (the same for (a, b) and (b, a))."""
    lo, hi = sorted((a, b))
    return _hkdf(agree(private, peer_public), f"mask\x00{session}\x00{lo}\x00{hi}")


def share_key(private: bytes, peer_public: bytes, session: str, sender: str, receiver: str) -> bytes:
    """The AEAD key for the one message ``sender`` sends ``receiver`` in ``session`` (directional)."""
    return _hkdf(agree(private, peer_public), f"share\x00{session}\x00{sender}\x00{receiver}")


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_NONCE, plaintext, aad)


def decrypt(key: bytes, ciphertext: bytes, aad: bytes, where: str) -> bytes:
    """Authenticated decryption; SignatureError naming ``where`` when the message was altered
    or was not encrypted to us."""
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE, ciphertext, aad)
    except InvalidTag:
        raise SignatureError(f"{where}: encrypted share fails authentication (altered, or not meant for us)") from None


class _Stream:
    """The ChaCha20 keystream of (seed, label), read sequentially into numpy buffers."""

    def __init__(self, seed: bytes, label: str) -> None:
        nonce = hashlib.sha256(b"fedfs-mask-nonce\x00" + label.encode()).digest()[:16]
        self._enc = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()

    def fill(self, out: np.ndarray) -> None:
        flat = out.reshape(-1).view(np.uint8)
        for start in range(0, flat.size, _CHUNK):
            part = flat[start:start + _CHUNK]
            self._enc.update_into(_ZEROS[:part.size], part)


def apply_mask(arrays: Mapping[str, np.ndarray], seed: bytes, sign: int,
               scratch: dict[str, np.ndarray] | None = None) -> None:
    """Add (``sign`` = +1) or subtract (-1) the mask of ``seed`` to every array, in place,
    modulo its word size. The mask is one keystream per word type, laid over that type's
    tensors in name order. ``scratch`` (name -> array like each) avoids an allocation per call."""
    if sign not in (1, -1):
        raise ValueError("sign must be +1 or -1")
    for word in ("uint32", "uint64"):
        names = sorted(n for n, a in arrays.items() if a.dtype == WORD_DTYPES[word])
        stream = _Stream(seed, word) if names else None
        for name in names:
            arr = arrays[name]
            if not arr.flags.c_contiguous or not arr.flags.writeable:
                raise ValueError(f"tensor {name!r}: masks apply to contiguous writeable arrays")
            mask = scratch[name] if scratch is not None and name in scratch else np.empty_like(arr)
            stream.fill(mask)
            if sign > 0:
                np.add(arr, mask, out=arr)
            else:
                np.subtract(arr, mask, out=arr)
    other = [n for n, a in arrays.items() if a.dtype not in (np.uint32, np.uint64)]
    if other:
        raise ValueError(f"tensors {other[:3]}: masks apply to uint32/uint64 arrays only")
