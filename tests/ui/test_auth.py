"""Password hashes: scrypt (hashlib as reference), salted, self-describing, constant-time check; the throttle."""

from __future__ import annotations

import base64
import hashlib

import pytest

from ui.auth import PasswordHash, hash_password, verify_password
from ui.login import LoginThrottle


def test_hash_is_scrypt_of_the_password_with_its_salt():
    stored = hash_password("s3cret", n=2**10, r=8, p=1)
    scheme, n, r, p, salt, key = stored.split(":")
    assert (scheme, n, r, p) == ("scrypt", "1024", "8", "1")
    expected = hashlib.scrypt(b"s3cret", salt=base64.b64decode(salt), n=1024, r=8, p=1, dklen=32)
    assert base64.b64decode(key) == expected


def test_verify_accepts_only_the_password():
    stored = hash_password("correct horse", n=2**10)
    assert verify_password("correct horse", stored)
    for wrong in ("", "correct horse ", "Correct horse", "correct hors", "correct horse\n"):
        assert not verify_password(wrong, stored)


def test_each_hash_has_its_own_salt():
    a, b = hash_password("same", n=2**10), hash_password("same", n=2**10)
    assert a != b and verify_password("same", a) and verify_password("same", b)


def test_default_cost():
    parsed = PasswordHash.parse(hash_password("x"))
    assert (parsed.n, parsed.r, parsed.p, len(parsed.salt), len(parsed.key)) == (2**14, 8, 1, 16, 32)


@pytest.mark.parametrize(("stored", "message"), [
    ("plain-text-password", "not of the form"),
    ("bcrypt:1024:8:1:c2FsdHNhbHQ=:a2V5a2V5a2V5a2V5a2V5a2V5", "not of the form"),
    ("scrypt:abc:8:1:c2FsdHNhbHQ=:a2V5a2V5a2V5a2V5a2V5a2V5", "non-numeric"),
    ("scrypt:1000:8:1:c2FsdHNhbHQ=:a2V5a2V5a2V5a2V5a2V5a2V5", "unsupported scrypt parameters"),
    ("scrypt:1048576:64:1:c2FsdHNhbHQ=:a2V5a2V5a2V5a2V5a2V5a2V5", "unsupported scrypt parameters"),
    ("scrypt:1024:8:1:c2FsdA==:a2V5a2V5a2V5a2V5a2V5a2V5", "too short"),
    ("scrypt:1024:8:1:not*base64:a2V5a2V5a2V5a2V5a2V5a2V5", "bad base64"),
])
def test_malformed_hashes_are_refused_clearly(stored, message):
    with pytest.raises(ValueError, match=message):
        verify_password("anything", stored)


def test_empty_password_cannot_be_hashed():
    with pytest.raises(ValueError, match="empty"):
        hash_password("")


def test_throttle_pauses_after_too_many_failures_then_recovers():
    throttle = LoginThrottle(max_failures=3, window_s=60.0)
    for t in (0.0, 1.0, 2.0):
        assert throttle.blocked_for(now=t) == 0.0
        throttle.fail(now=t)
    assert throttle.blocked_for(now=3.0) == pytest.approx(57.0)
    assert throttle.blocked_for(now=59.9) == pytest.approx(0.1)
    assert throttle.blocked_for(now=60.0) == 0.0  # the first failure left the window
