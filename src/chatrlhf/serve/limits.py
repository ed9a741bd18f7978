"""Who may ask and how much: API keys (kept as SHA-256 digests, compared in constant time) and the admission gate
(requests in flight per key → 429, replies waiting for a row → 503, both with Retry-After so that the `openai`
client retries them). The gate lives on the event loop's thread: no lock."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from chatrlhf.errors import UsageError
from chatrlhf.serve.protocol import APIError

ANONYMOUS = "-"        # the one "key" of a server started without API keys
RETRY_AFTER = 1        # seconds: a reply takes about that long on a CPU


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_keys(api_key: str, keys_file: str) -> list[str]:
    """The digests of --api-key and of every line of --api-keys (blank lines and # comments skipped)."""
    keys = [api_key] if api_key else []
    if keys_file:
        path = Path(keys_file)
        if not path.is_file():
            raise UsageError(f"--api-keys {keys_file}: file not found", "give a file with one API key per line")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                if len(line) < 16 or any(c.isspace() for c in line):
                    raise UsageError(f"{keys_file}:{n}: an API key must be at least 16 characters with no spaces",
                                     "make keys with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
                keys.append(line)
        if len(keys) == (1 if api_key else 0):
            raise UsageError(f"--api-keys {keys_file}: no keys in the file", "put one API key per line")
    return [digest(k) for k in keys]


def bearer_digest(authorization: str | None) -> str | None:
    """The digest of the token of an ``Authorization: Bearer TOKEN`` header; None without one."""
    scheme, _, token = (authorization or "").partition(" ")
    return digest(token.strip()) if scheme.lower() == "bearer" and token.strip() else None


def known(d: str, digests: list[str]) -> bool:
    return any([hmac.compare_digest(d, k) for k in digests])  # every key compared: no early exit


def caller(authorization: str | None, digests: list[str]) -> str:
    """The caller's key id (its digest's first 12 hex digits; ANONYMOUS without keys), or a 401."""
    if not digests:
        return ANONYMOUS
    d = bearer_digest(authorization)
    if d is None:
        raise APIError(401, "no API key: send the header 'Authorization: Bearer YOUR_KEY' (the openai client's "
                       "api_key)", None, "invalid_api_key")
    if not known(d, digests):
        raise APIError(401, "incorrect API key", None, "invalid_api_key")
    return d[:12]


def admin_caller(authorization: str | None, admin: str | None, digests: list[str]) -> None:
    """Passes the admin key (digest ``admin``) alone: 403 when the server has none (hot swap disabled) or for an
    ordinary API key, 401 for none or a wrong one."""
    if admin is None:
        raise APIError(403, "hot swap is disabled: start with --admin-key (or CHATRLHF_ADMIN_KEY)", None,
                       "admin_disabled")
    d = bearer_digest(authorization)
    if d is None:
        raise APIError(401, "no admin key: send the header 'Authorization: Bearer ADMIN_KEY'", None,
                       "invalid_admin_key")
    if not hmac.compare_digest(d, admin):
        if known(d, digests):
            raise APIError(403, "an API key cannot do this: admin routes take the --admin-key", None,
                           "not_admin")
        raise APIError(401, "incorrect admin key", None, "invalid_admin_key")


class Gate:
    """Admission: at most ``per_key`` requests in flight per key, at most ``rows`` replies (running + waiting) in
    the server."""

    def __init__(self, rows: int, per_key: int):
        self.rows_limit, self.per_key = rows, per_key
        self.rows, self.by_key = 0, {}

    def enter(self, key: str, rows: int) -> None:
        if self.by_key.get(key, 0) >= self.per_key:
            raise APIError(429, f"too many requests in flight for this API key (limit {self.per_key}): retry when "
                           "one has finished", None, "rate_limit_exceeded", RETRY_AFTER)
        if self.rows + rows > self.rows_limit:
            raise APIError(503, f"the server is full ({self.rows} replies running or queued, limit "
                           f"{self.rows_limit}): retry shortly", None, "server_overloaded", RETRY_AFTER)
        self.by_key[key] = self.by_key.get(key, 0) + 1
        self.rows += rows

    def leave(self, key: str, rows: int) -> None:
        self.rows -= rows
        self.by_key[key] -= 1
        if not self.by_key[key]:
            del self.by_key[key]
