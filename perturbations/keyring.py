"""Keyed randomness for the perturbation methods.

A :class:`Keyring` holds 32 bytes of secret key material (derived from the user's key by
``protect.keys``) and hands out independent, reproducible random streams, one per *purpose*
string (``"cuda/filters"``, ``"uc/init"``, ...). Streams for different purposes are
independent because each is seeded from ``HMAC-SHA256(material, purpose)``; so one key never
reuses a stream, and a training seed is never the protection key.
"""

from __future__ import annotations

import hashlib
import hmac

import torch

from .errors import KeyMaterialError

_FINGERPRINT_LABEL = b"protect/fingerprint/v1"


class Keyring:
    """Deterministic, purpose-separated random streams derived from secret key material.

    Args:
        material: at least 16 bytes of secret key material (normally a KDF output).
    """

    __slots__ = ("_material",)

    def __init__(self, material: bytes) -> None:
        if not isinstance(material, (bytes, bytearray)) or len(material) < 16:
            raise KeyMaterialError("key material must be at least 16 bytes")
        self._material = bytes(material)

    def __repr__(self) -> str:  # never show the material
        return f"Keyring(fingerprint={self.fingerprint()})"

    def digest(self, purpose: str, data: bytes = b"") -> bytes:
        """HMAC-SHA256 of ``purpose`` (and optional ``data``) under the key material."""
        mac = hmac.new(self._material, purpose.encode("utf-8"), hashlib.sha256)
        if data:
            mac.update(b"\x00")
            mac.update(data)
        return mac.digest()

    def seed(self, purpose: str) -> int:
        """A 63-bit seed for ``purpose``; use :meth:`generator` where possible."""
        return int.from_bytes(self.digest(purpose)[:8], "big") >> 1

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU ``torch.Generator`` seeded for ``purpose``.

        Always CPU: draws are then identical on every machine; move the result to the
        device afterwards.
        """
        gen = torch.Generator(device="cpu")
        gen.manual_seed(self.seed(purpose))
        return gen

    def unit(self, purpose: str, item: str) -> float:
        """A keyed uniform number in [0, 1) for one item (e.g. a file's relative path).

        It depends only on the key, the purpose and the item, never on order or batching.
        """
        word = int.from_bytes(self.digest(purpose, item.encode("utf-8"))[:8], "big")
        return word / 2.0**64

    def fingerprint(self) -> str:
        """A short public fingerprint (HMAC of a fixed label); safe to store and show."""
        return hmac.new(self._material, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]

    @classmethod
    def from_seed(cls, seed: int) -> "Keyring":
        """A keyring for tests and examples only (no KDF, not secret)."""
        return cls(hashlib.sha256(f"protect-test-seed:{seed}".encode()).digest())
