"""API keys: how a client presents one, and the constant-time check. Keys are never logged; the
multi-user database stores only a peppered hash of each.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from starlette.requests import HTTPConnection, Request

from streamscribe.config import TIERS, Settings, TierLimits
from streamscribe.protocol import AddressRefused, AuthMessage, ErrorType, StreamError, parse_client_message
from streamscribe.server.quotas import Quotas
from streamscribe.server.store import KeyRecord, KeyStore, open_store

log = logging.getLogger(__name__)

SCOPES = ("stream", "limits")
SINGLE_USER = "default"
# A single-user key shorter than this is refused at start-up: the server's whole protection is the key.
MIN_API_KEY_LENGTH = 16


def generate_api_key() -> str:
    """A random 32-byte key, URL-safe."""
    return secrets.token_urlsafe(32)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class Principal:
    """Who is connecting, once their key is accepted.

    Attributes:
        user_id: Quotas count per user.
        key_id: The key's public id (for logs and rate limits; never the key).
        tier: The user's tier, or ``single_user`` in single-user mode.
        limits: The tier's limits; None in single-user mode (usage is counted, never refused).
        scope: ``stream`` or ``limits`` (a key that may only read its limits).
        expires_at: Unix time the key expires, or None.
    """

    user_id: str
    key_id: str
    tier: str
    limits: TierLimits | None
    scope: str = "stream"
    expires_at: float | None = None

    @property
    def may_stream(self) -> bool:
        return self.scope == "stream"


class Authenticator(Protocol):
    async def authenticate(self, presented: str) -> Principal | None:
        """The principal for this key, or None when it is wrong, revoked or expired."""
        ...

    async def still_usable(self, principal: Principal) -> bool:
        """Whether an admitted principal's key is still neither revoked nor expired (open streams ask)."""
        ...


class SingleUserAuth:
    """One key for the whole server; only its SHA-256 is kept in memory."""

    def __init__(self, api_key: str) -> None:
        self._digest = _digest(api_key)

    def is_valid(self, presented: str | None) -> bool:
        # Comparing digests keeps the comparison constant-time whatever the presented length.
        return presented is not None and hmac.compare_digest(_digest(presented), self._digest)

    async def authenticate(self, presented: str) -> Principal | None:
        if not self.is_valid(presented):
            return None
        return Principal(SINGLE_USER, SINGLE_USER, "single_user", None)

    async def still_usable(self, principal: Principal) -> bool:
        return True  # the one key comes from the settings: it changes only with a restart


KEY_PREFIX = "ssk"


@dataclass(frozen=True)
class NewKey:
    """A key just created: ``key`` is shown once and never stored."""

    key: str
    record: KeyRecord


class KeyHasher:
    """HMAC-SHA-256 of a key with the server's pepper: a stolen database alone cannot check guesses."""

    def __init__(self, pepper: bytes) -> None:
        self._pepper = pepper

    def hash(self, key: str) -> str:
        return hmac.new(self._pepper, key.encode(), hashlib.sha256).hexdigest()

    def matches(self, key: str, key_hash: str) -> bool:
        return hmac.compare_digest(self.hash(key), key_hash)


def key_id_of(key: str) -> str | None:
    """The public id written into a multi-user key (``ssk_<id>_<secret>``), or None for another shape."""
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or len(key_id) != 12 or not secret:
        return None
    return key_id


def load_pepper(settings: Settings) -> bytes:
    """The configured pepper, or the one generated into the data folder on first use."""
    if settings.key_pepper is not None:
        return settings.key_pepper.get_secret_value().encode()
    if settings.database_url and not settings.database_url.startswith("sqlite"):
        raise ValueError("STREAMSCRIBE_KEY_PEPPER must be set with a shared database (replicas share it)")
    path = settings.data_dir / "key_pepper"
    if not path.exists():
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first
        else:
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(32))
    for _ in range(50):  # a concurrent creator may not have written it yet
        pepper = path.read_text().strip()
        if pepper:
            return pepper.encode()
        time.sleep(0.01)
    raise RuntimeError(f"empty key pepper file: {path}")


def create_key(
    store: KeyStore,
    hasher: KeyHasher,
    user_id: str,
    tier: str | None = None,
    scope: str = "stream",
    expires_at: float | None = None,
) -> NewKey:
    """A new random key for ``user_id``; the store keeps its hash only."""
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    record = store.add_key(key_id, user_id, hasher.hash(key), tier, scope, expires_at)
    return NewKey(key, record)


class MultiUserAuth:
    """Keys from the database: found by their public id, then checked against the stored hash in
    constant time."""

    def __init__(self, store: KeyStore, hasher: KeyHasher, settings: Settings) -> None:
        self._store = store
        self._hasher = hasher
        self._settings = settings
        self._dummy_hash = hasher.hash(generate_api_key())

    async def authenticate(self, presented: str) -> Principal | None:
        key_id = key_id_of(presented)
        record = await asyncio.to_thread(self._store.find_key, key_id) if key_id else None
        # Hash and compare even for an unknown id, so the time taken says nothing about which ids exist.
        matches = self._hasher.matches(presented, record.key_hash if record else self._dummy_hash)
        if record is None or not matches or not record.is_usable(time.time()):
            return None
        if record.tier not in TIERS:
            log.warning(
                "user %s has an unknown tier %r: the free tier's limits apply",
                record.user_id,
                record.tier,
                extra={"event": "unknown_tier"},
            )
        return Principal(
            record.user_id,
            record.key_id,
            record.tier,
            self._settings.tiers.limits(record.tier),
            record.scope,
            record.expires_at,
        )

    async def still_usable(self, principal: Principal) -> bool:
        try:
            record = await asyncio.to_thread(self._store.find_key, principal.key_id)
        except Exception:
            # A database hiccup must not end every open stream: the next check asks again.
            log.warning("could not re-check an open stream's key", exc_info=True)
            return True
        return record is not None and record.is_usable(time.time())


class IpAllowlist:
    """Addresses and CIDR ranges; an empty list allows everyone."""

    def __init__(self, entries: list[str]) -> None:
        self._networks = [ipaddress.ip_network(entry.strip(), strict=False) for entry in entries]

    def allows(self, host: str | None) -> bool:
        if not self._networks:
            return True
        try:
            address = ipaddress.ip_address(host or "")
        except ValueError:
            return False
        return any(address in network for network in self._networks)


def presented_key(connection: HTTPConnection, allow_query_token: bool = True) -> str | None:
    """The key from ``X-API-KEY``, ``Authorization: Bearer`` or (when allowed) ``?token=``, if any."""
    header = connection.headers.get("x-api-key")
    if header:
        return header.strip()
    authorization = connection.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if not allow_query_token:
        return None
    return connection.query_params.get("token") or None


ReceiveText = Callable[[], Awaitable[str]]
_TOO_MANY_FAILURES = "too many attempts with a wrong or missing key from this address; try again in a minute"


class AccessControl:
    """Everything between a connection and a stream: address allowlist, rate limits, the key, its scope
    and its quotas."""

    def __init__(self, settings: Settings, api_key: str) -> None:
        self.settings = settings
        self.allowlist = IpAllowlist(settings.access.ip_allowlist)
        self.store: KeyStore | None = None
        self.authenticator: Authenticator
        if settings.auth_mode == "multi_user":
            self.store = open_store(settings)
            self.authenticator = MultiUserAuth(self.store, KeyHasher(load_pepper(settings)), settings)
        else:
            self.authenticator = SingleUserAuth(api_key)
        self.quotas = Quotas(settings, self.store)
        # Addresses past the failed-key limit, until the end of its minute: refused before any key check,
        # so that a right guess looks like a wrong one.
        self._locked_out: dict[str, float] = {}

    @property
    def multi_user(self) -> bool:
        return self.settings.auth_mode == "multi_user"

    def _check_address(self, connection: HTTPConnection) -> None:
        if not self.allowlist.allows(connection.client.host if connection.client else None):
            raise AddressRefused()

    async def admit(self, connection: HTTPConnection, receive_text: ReceiveText) -> Principal:
        """The principal of a new WebSocket, or StreamError: forbidden (address, scope), rate_limited or
        auth_failed."""
        access = self.settings.access
        self._check_address(connection)
        host = connection.client.host if connection.client else "unknown"
        if self.multi_user:
            per_ip = access.connections_per_minute_per_ip
            await self.quotas.check_rate("ip", host, per_ip, "from this address")
        key = presented_key(connection, access.allow_query_token)
        if key is None and not access.allow_query_token and connection.query_params.get("token"):
            raise StreamError(
                ErrorType.AUTH_FAILED,
                "keys in the URL (?token=) are disabled here: send an X-API-KEY or Authorization: Bearer "
                'header, or a first message {"type":"auth","token":...}',
            )
        if key is None:
            key = await self._receive_auth_message(receive_text)
        self._check_lockout(host)
        principal = await self.authenticator.authenticate(key)
        if principal is None:
            await self._count_failure(host)
            # Clients (CLI, browser page) show this text; wrong, revoked and expired look alike on purpose.
            raise StreamError(ErrorType.AUTH_FAILED, "missing or invalid API key")
        if self.multi_user:
            await self.quotas.check_rate(
                "key", principal.key_id, access.connections_per_minute_per_key, "with this key"
            )
        if not principal.may_stream:
            raise StreamError(ErrorType.FORBIDDEN, "this key may not open streams")
        return principal

    async def _receive_auth_message(self, receive_text: ReceiveText) -> str:
        timeout = self.settings.access.auth_message_timeout_seconds
        missing = StreamError(
            ErrorType.AUTH_FAILED,
            f"missing or invalid API key: send it as ?token=, an X-API-KEY or Authorization: Bearer header, "
            f'or a first message {{"type":"auth","token":...}} within {timeout:g} s',
        )
        try:
            message = parse_client_message(await asyncio.wait_for(receive_text(), timeout))
        except (TimeoutError, StreamError):
            raise missing from None
        if not isinstance(message, AuthMessage):
            raise missing
        return message.token

    async def principal_for_request(self, connection: HTTPConnection) -> Principal:
        """The principal of an HTTP request (key as header or ?token=), or StreamError with its reason."""
        self._check_address(connection)
        host = connection.client.host if connection.client else "unknown"
        self._check_lockout(host)
        key = presented_key(connection, self.settings.access.allow_query_token)
        principal = await self.authenticator.authenticate(key) if key else None
        if principal is None:
            await self._count_failure(host)
            raise StreamError(ErrorType.AUTH_FAILED, "missing or invalid API key")
        return principal

    def _check_lockout(self, host: str) -> None:
        until = self._locked_out.get(host)
        if until is not None and time.time() < until:
            raise StreamError(ErrorType.RATE_LIMITED, _TOO_MANY_FAILURES)

    async def _count_failure(self, host: str) -> None:
        """Count a wrong or missing key from ``host``; past the limit, lock the address out (rate_limited)
        until the minute ends (the window the counters count in, shared through Redis)."""
        per_minute = self.settings.access.failed_auth_per_minute_per_ip
        try:
            await self.quotas.check_rate("auth_failure", host, per_minute, "")
        except StreamError:
            now = time.time()
            self._locked_out = {h: t for h, t in self._locked_out.items() if t > now}
            self._locked_out[host] = (now // 60 + 1) * 60
            raise StreamError(ErrorType.RATE_LIMITED, _TOO_MANY_FAILURES) from None

    async def close(self) -> None:
        await self.quotas.close()
        if self.store is not None:
            self.store.close()


async def require_principal(request: Request) -> Principal:
    """FastAPI dependency for HTTP routes that transcribe (the file API): the caller's principal, or
    StreamError (auth_failed; rate_limited; forbidden by address or by a key scoped to ``limits``), answered
    with its type's status.

    The same checks as a stream's (allowlist, key, expiry, revocation, scope), for the file API.
    """
    access: AccessControl = request.app.state.runtime.access
    principal = await access.principal_for_request(request)
    if not principal.may_stream:
        raise StreamError(ErrorType.FORBIDDEN, "this key may not transcribe (it may only read its limits)")
    return principal
