"""API keys, tenants and the cache salt that keeps one tenant's KV away from another's.

Keys fail closed: a key file with a line that is not `key tenant` (or a comment, or blank) stops the
router with the file and line number (never the line itself: it holds a key), and so does a key file
with no key at all. Before, such lines were skipped one by one, and a file of only bad lines turned
authentication off without a word.

The salt a worker sees is `sha256("beluga-kv tenant salt v1" + netstring(tenant) [+ netstring(client
salt)])`, hex: lengths prefix both parts, so no two (tenant, client salt) pairs give one salt. Joining them
as `tenant:salt` made tenant "a" with salt "b" and tenant "a:b" share a cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import Request

from beluga.router.errors import ApiError
from beluga.router.settings import RouterSettings

SALT_DOMAIN = b"beluga-kv tenant salt v1"


def _digest(key: str) -> bytes:
    # Keys are looked up by their hash: a dict lookup then says nothing, by its timing, about a real key.
    return hashlib.sha256(key.encode()).digest()


def _lines(path: str):
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield n, line.split()


def load(s: RouterSettings) -> tuple[dict[bytes, str], set[bytes]]:
    """(key digest -> tenant, admin key digests). Raises ValueError on any line it cannot read."""
    if any(not k.strip() or not t.strip() for k, t in s.api_keys.items()):
        raise ValueError("api_keys: an empty key or tenant")
    keys = {_digest(k): t for k, t in s.api_keys.items()}
    if s.api_keys_file:
        for n, fields in _lines(s.api_keys_file):
            if len(fields) != 2:
                raise ValueError(f"{s.api_keys_file}, line {n}: expected 'KEY TENANT', found {len(fields)} "
                                 f"field(s); the router does not start with a key file it cannot read")
            if _digest(fields[0]) in keys:
                raise ValueError(f"{s.api_keys_file}, line {n}: this key is given twice")
            keys[_digest(fields[0])] = fields[1]
        if not keys:
            raise ValueError(f"{s.api_keys_file} holds no key: authentication would be off")
    admins = {_digest(k) for k in s.admin_api_keys}
    if s.admin_api_keys_file:
        for n, fields in _lines(s.admin_api_keys_file):
            if len(fields) != 1:
                raise ValueError(f"{s.admin_api_keys_file}, line {n}: expected one key, found {len(fields)} fields")
            admins.add(_digest(fields[0]))
        if not admins:
            raise ValueError(f"{s.admin_api_keys_file} holds no key")
    if admins and not keys:
        raise ValueError("admin keys without API keys: the /v1 routes would be open while /metrics is not")
    if admins & keys.keys():
        raise ValueError("a key is both an API key and an admin key")
    return keys, admins


def worker_key(s: RouterSettings) -> str | None:
    if s.worker_api_key_file:
        key = Path(s.worker_api_key_file).read_text().strip()
        if not key or len(key.split()) != 1:
            raise ValueError(f"{s.worker_api_key_file} must hold one key")
        return key
    return s.worker_api_key.get_secret_value() if s.worker_api_key else None


class Auth:
    def __init__(self, keys: dict[bytes, str], admins: set[bytes]):
        self.keys, self.admins = keys, admins

    @property
    def on(self) -> bool:
        return bool(self.keys)

    def tenant(self, request: Request, admin_ok: bool = False) -> str | None:
        """The request's tenant (None when keys are off, or for an admin key where `admin_ok`); else 401."""
        if not self.on:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        d = _digest(token.strip()) if scheme.lower() == "bearer" and token.strip() else b""
        if d in self.keys:
            return self.keys[d]
        if admin_ok and d in self.admins:
            return None
        raise ApiError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.", "invalid_api_key")


def _netstring(text: str) -> bytes:
    b = text.encode()
    return b"%d:%s," % (len(b), b)


def salt(tenant: str, client_salt: str | None) -> str:
    parts = SALT_DOMAIN + _netstring(tenant) + (_netstring(client_salt) if client_salt is not None else b"")
    return hashlib.sha256(parts).hexdigest()
