"""The feedback app's defences that are not about one route: the log-in limiter, device cookies, security
headers with a per-request script nonce, and the checks on JSON writes.

Log-in limiting follows OWASP's "device cookie" pattern: failed log-ins are counted per user name (5 a minute,
whatever the address, on every log-in route), but a browser that has logged in as that name before carries a
signed device cookie and has a count of its own — so someone else's guessing cannot lock the real user out. A
global cap on failures a minute bounds the password-hashing work anyone can cause, and the table forgets names
after a minute and never holds more than ``max_names`` of them.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque

from itsdangerous import BadSignature, URLSafeTimedSerializer

from chatrlhf.feedback.errors import PermissionDenied, TooManyAttempts, UnsupportedMediaType

DEVICE_COOKIE = "chatrlhf_device"
DEVICE_DAYS = 30


class LoginLimiter:
    def __init__(self, per_name: int = 5, window: float = 60.0, global_cap: int = 200, max_names: int = 10_000):
        self.per_name, self.window, self.global_cap, self.max_names = per_name, window, global_cap, max_names
        self.failures: OrderedDict[tuple, deque] = OrderedDict()  # (name, trusted device) → failure times
        self.everyone: deque = deque()

    def _recent(self, times: deque, now: float) -> deque:
        while times and times[0] < now - self.window:
            times.popleft()
        return times

    def check(self, name: str, trusted: bool) -> None:
        """429 before any password is checked when this name (on this kind of device) or everyone is over limit."""
        now = time.monotonic()
        if len(self._recent(self.everyone, now)) >= self.global_cap:
            raise TooManyAttempts("too many failed log-ins on this server; wait a minute")
        times = self.failures.get((name.casefold(), trusted))
        if times is not None and len(self._recent(times, now)) >= self.per_name:
            raise TooManyAttempts("too many failed log-ins for this name; wait a minute")

    def failed(self, name: str, trusted: bool) -> None:
        now = time.monotonic()
        key = (name.casefold(), trusted)
        self.failures.setdefault(key, deque()).append(now)
        self.failures.move_to_end(key)
        self.everyone.append(now)
        while self.failures:  # forget names whose failures are all older than the window, and the oldest beyond max
            first = next(iter(self.failures))
            if len(self.failures) <= self.max_names and self._recent(self.failures[first], now):
                break
            del self.failures[first]


class DeviceCookies:
    """A signed, dated cookie naming the user who logged in from this browser."""

    def __init__(self, secret: str, production: bool):
        self.signer = URLSafeTimedSerializer(secret, salt="chatrlhf-device")
        self.production = production

    def trusted(self, request, name: str) -> bool:
        value = request.cookies.get(DEVICE_COOKIE)
        if not value:
            return False
        try:
            return str(self.signer.loads(value, max_age=DEVICE_DAYS * 86400)).casefold() == name.casefold()
        except BadSignature:
            return False

    def set(self, response, name: str) -> None:
        response.set_cookie(DEVICE_COOKIE, self.signer.dumps(name), max_age=DEVICE_DAYS * 86400, httponly=True,
                            samesite="strict", secure=self.production)


def csp(nonce: str) -> str:
    """Scripts only with this response's nonce; nothing from elsewhere; no framing; forms post here only."""
    return (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class SecurityHeaders:
    """Pure ASGI middleware (no per-request task, unlike BaseHTTPMiddleware): a fresh script nonce in
    ``request.state.csp_nonce`` for the templates, and on every response CSP, no framing, no sniffing, no referrer,
    no caching (pages and exports are per user), and HSTS in production."""

    def __init__(self, app, production: bool = False):
        self.app, self.production = app, production

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        nonce = secrets.token_urlsafe(16)
        scope.setdefault("state", {})["csp_nonce"] = nonce
        extra = [(b"content-security-policy", csp(nonce).encode()), (b"x-frame-options", b"DENY"),
                 (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                 (b"cache-control", b"no-store")]
        if self.production:
            extra.append((b"strict-transport-security", b"max-age=31536000; includeSubDomains"))

        async def with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [(k, v) for k, v in extra if k not in names]
            await send(message)

        return await self.app(scope, receive, with_headers)


def check_json_write(request) -> None:
    """JSON writes: a JSON body (a cross-site form cannot send one without a CORS preflight) from this origin, if
    the browser says where it comes from."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise UnsupportedMediaType("send the body as JSON (Content-Type: application/json)")
    origin = request.headers.get("origin")
    if origin and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
        raise PermissionDenied(f"cross-origin request from {origin} refused")
