"""Dashboard passwords: salted scrypt hashes in one self-describing string, checked in constant time.

The string is ``scrypt:<N>:<r>:<p>:<salt, base64>:<key, base64>``; ':' (not crypt's '$') keeps it usable verbatim in
shells, .env files and docker compose, which would expand '$'.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

SCHEME = "scrypt"
# 2**14 x 8 x 1 needs 16 MiB and takes tens of milliseconds: fine for a login, costly for a guessing attack.
DEFAULT_N, DEFAULT_R, DEFAULT_P = 2**14, 8, 1
SALT_BYTES = 16
KEY_BYTES = 32
NO_PASSWORD = ("No dashboard password is configured. Make a hash with `valora ui hash-password` and set it as "
               "VALORA_UI__PASSWORD_HASH (or ui.password_hash in the config file), then restart the dashboard.")
MAX_MEMORY = 2**30  # refuse hashes whose check would allocate more than 1 GiB (scrypt needs 128 * N * r bytes)


@dataclass(frozen=True)
class PasswordHash:
    """``scrypt:<N>:<r>:<p>:<salt>:<key>`` parsed."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def __str__(self) -> str:
        return ":".join([SCHEME, str(self.n), str(self.r), str(self.p), _b64(self.salt), _b64(self.key)])

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """ValueError says what is wrong with a configured hash (without echoing it)."""
        parts = text.strip().split(":")
        if len(parts) != 6 or parts[0] != SCHEME:
            raise ValueError("the password hash is not of the form scrypt:N:r:p:salt:key "
                             "(make one with `valora ui hash-password`)")
        try:
            n, r, p = (int(v) for v in parts[1:4])
            salt, key = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
        except ValueError:
            raise ValueError("the password hash has a non-numeric parameter or bad base64") from None
        if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or 128 * n * r > MAX_MEMORY:
            raise ValueError(f"the password hash has unsupported scrypt parameters N={n} r={r} p={p}")
        if len(salt) < 8 or len(key) < 16:
            raise ValueError("the password hash's salt or key is too short")
        return cls(n, r, p, salt, key)


def hash_password(password: str, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P) -> str:
    """A new salted scrypt hash of ``password`` as one string for settings.ui.password_hash."""
    if not password:
        raise ValueError("the password is empty")
    salt = secrets.token_bytes(SALT_BYTES)
    return str(PasswordHash(n, r, p, salt, _derive(password, salt, n, r, p, KEY_BYTES)))


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches the stored hash; the comparison takes the same time wherever they differ."""
    parsed = PasswordHash.parse(stored)
    candidate = _derive(password, parsed.salt, parsed.n, parsed.r, parsed.p, len(parsed.key))
    return hmac.compare_digest(candidate, parsed.key)


def _derive(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + 2**20,
                          dklen=length)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
