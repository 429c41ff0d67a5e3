"""Keys: where they come from, how they are stretched, what may be written down.

A key is a secret string the owner keeps. It is stretched with scrypt (a slow, memory-hard KDF,
so short passphrases cannot be brute-forced cheaply) into 32 bytes of material held by a
:class:`~perturbations.keyring.Keyring`, which hands out independent random streams per purpose.
The salt is fixed so that the same key gives byte-identical outputs on every machine; the run
record holds only :meth:`Keyring.fingerprint` (an HMAC of a fixed label), never the key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import stat
from functools import lru_cache
from pathlib import Path

from perturbations.keyring import Keyring

from .errors import KeyMaterialError

log = logging.getLogger(__name__)

ENV_VAR = "PROTECT_KEY"
MIN_LENGTH = 12
_SALT = b"protect/kdf/v1"
_SCRYPT = {"n": 2**15, "r": 8, "p": 1, "maxmem": 64 * 1024 * 1024, "dklen": 32}


@lru_cache(maxsize=8)
def _stretch(secret: str) -> bytes:
    return hashlib.scrypt(secret.encode("utf-8"), salt=_SALT, **_SCRYPT)


def derive_keyring(secret: str) -> Keyring:
    """Stretch a secret key string into a :class:`Keyring` (scrypt, N=2^15, r=8, p=1)."""
    if not isinstance(secret, str) or not secret:
        raise KeyMaterialError("the key is empty")
    if len(secret) < MIN_LENGTH:
        log.warning("key is shorter than %d characters; use `protect keygen` for a strong one", MIN_LENGTH)
    return Keyring(_stretch(secret))


def generate_key() -> str:
    """A fresh random 128-bit key, as 32 hex characters."""
    return secrets.token_hex(16)


def write_key_file(path: str | os.PathLike, key: str) -> Path:
    """Write ``key`` to a new file readable by its owner only (0600); never overwrite a file."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyMaterialError(f"{path} already exists: a key file is never overwritten (choose another name, "
                               "or delete the old one if you are sure nothing was protected with it)") from None
    except OSError as exc:
        raise KeyMaterialError(f"cannot create key file {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(key + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def resolve_key(key: str | None = None, key_file: str | os.PathLike | None = None,
                environ: dict[str, str] | None = None) -> str:
    """The key from exactly one of ``--key``, ``--key-file`` or ``$PROTECT_KEY``.

    A key file holds the key on its first line; surrounding whitespace is ignored.
    """
    env = os.environ if environ is None else environ
    from_env = env.get(ENV_VAR) or None
    given = [name for name, value in (("--key", key), ("--key-file", key_file), (ENV_VAR, from_env)) if value]
    if not given:
        raise KeyMaterialError(f"no key: give --key, --key-file or set {ENV_VAR} (make one with `protect keygen`)")
    if len(given) > 1:
        raise KeyMaterialError(f"several keys given ({', '.join(given)}); give exactly one")
    if key:
        return key.strip()
    if key_file:
        path = Path(key_file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KeyMaterialError(f"key file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyMaterialError(f"cannot read key file {path}: {exc.__class__.__name__}") from None
        _warn_if_shared(path)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise KeyMaterialError(f"key file is empty: {path}")
        return lines[0]
    assert from_env is not None
    return from_env.strip()


def _warn_if_shared(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if os.name == "posix" and stat.S_ISREG(mode) and mode & 0o077:
        log.warning("key file %s can be read by other users (mode %o): `chmod 600 %s`", path,
                    stat.S_IMODE(mode), path)


def load_keyring(key: str | None = None, key_file: str | os.PathLike | None = None,
                 environ: dict[str, str] | None = None) -> Keyring:
    """Resolve the key from its one source and derive its :class:`Keyring`."""
    return derive_keyring(resolve_key(key, key_file, environ))
