"""Scoped API keys for the admin API: issued once, stored only as a hash, checked per request.

Imports base modules and wxd.store only; never tornado. The admin layer asks scopes_of(token)
for every request; what each route needs is the admin layer's table (wxd.admin.scopes).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

from wxd.clock import SYSTEM_CLOCK, Clock
from wxd.errors import WxdError
from wxd.store import keys as key_store
from wxd.store.db import Database
from wxd.store.keys import StoredKey

log = logging.getLogger(__name__)

# Every scope a key can hold. "admin" allows everything (the configured [admin] token is an
# admin); the others name one area of the admin API.
SCOPES: tuple[str, ...] = (
    "tokens:read",  # GET /v1/tokens/{app}, the jsapi ticket and JS-SDK signatures
    "pushes:read",  # push status and lists, templates
    "pushes:write",  # queue, retry, cancel pushes; refresh templates
    "users:read",  # identity lookups
    "users:write",  # MP login and decrypt, links
    "backfill",  # start and watch the follower backfill
    "campaigns",
    "callbacks",  # the callbacks to the backend: list, show, retry
    "console",  # the operator's read-only views: stats, metrics
    "admin",  # everything, including keys
)
ADMIN = "admin"
PREFIX = "wxd_"
KEY_BYTES = 32  # secrets.token_urlsafe(32): 43 URL-safe characters after the prefix
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TOUCH_INTERVAL_S = 60.0


class ApiKeyError(WxdError):
    """A refused key operation: `code` is the admin API's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def key_hash(key: str) -> str:
    """The stored form of a key: hex SHA-256 of its text. Keys are 256 random bits, so a fast
    hash suffices (nothing to brute-force); only this digest is ever written down."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_scopes(scopes: Iterable[object]) -> tuple[str, ...]:
    """Known scopes without repeats, in SCOPES order; ApiKeyError `invalid_scope` otherwise."""
    given = list(scopes)
    unknown = sorted({str(s) for s in given if s not in SCOPES})
    if unknown:
        raise ApiKeyError("invalid_scope", f"unknown scope(s) {', '.join(unknown)}; known: "
                          f"{', '.join(SCOPES)}")
    if not given:
        raise ApiKeyError("invalid_scope", "a key needs at least one scope")
    return tuple(s for s in SCOPES if s in given)


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: never the key itself, nor its hash. Times are unix seconds."""

    name: str
    scopes: tuple[str, ...]
    created_at: float
    last_used_at: float | None

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "scopes": list(self.scopes), "created_at": self.created_at,
                "last_used_at": self.last_used_at}


class ApiKeys:
    """Every scoped key, held in memory (wxd is the only writer of its database) and in SQLite.

    - create(name, scopes) returns the key's text once: "wxd_" + 43 URL-safe characters.
    - scopes_of(token) answers from memory, comparing digests in constant time; a revoked key
      is dropped from memory before its row is deleted, so it is refused from that instant.
    - Last use is kept in memory and written by a timer at most once per touch_interval_s for
      each key (and at stop), so authenticating never waits for a write.
    """

    def __init__(self, db: Database, *, clock: Clock = SYSTEM_CLOCK,
                 touch_interval_s: float = TOUCH_INTERVAL_S) -> None:
        self._db = db
        self._clock = clock
        self._interval_s = touch_interval_s
        self._by_hash: dict[str, StoredKey] = {}
        self._last_used: dict[str, float] = {}
        self._written: dict[str, float] = {}  # name -> last_used_at as last written
        self._write_time: dict[str, float] = {}  # name -> when it was written (clock)
        self._timer: asyncio.Task[None] | None = None
        self._state = "new"

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._by_hash)} keys)"

    async def start(self) -> None:
        """Load every key; start the last-use writer. Idempotent."""
        if self._state != "new":
            return
        self._state = "running"
        for stored in await self._db.read(key_store.load_all):
            self._by_hash[stored.key_hash] = stored
            if stored.last_used_at is not None:
                self._last_used[stored.name] = self._written[stored.name] = stored.last_used_at
        self._timer = asyncio.create_task(self._touch_loop(), name="wxd-apikeys-touch")

    async def stop(self) -> None:
        """Stop the timer and write the last-use times not yet written. Idempotent."""
        if self._state != "running":
            self._state = "stopped"
            return
        self._state = "stopped"
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
            self._timer = None
        try:
            await self.flush(force=True)
        except WxdError as exc:
            log.warning("API key last-use times not stored: %s", exc)

    async def _touch_loop(self) -> None:
        while True:
            await self._clock.sleep(self._interval_s)
            try:
                await self.flush()
            except WxdError as exc:  # the times stay in memory; the next tick tries again
                log.warning("API key last-use times not stored: %s", exc)

    # Checking ---------------------------------------------------------------------------------

    def scopes_of(self, token: str) -> frozenset[str] | None:
        """The scopes of the key `token`, None when it is no (longer a) key."""
        if not token.startswith(PREFIX):
            return None
        digest = key_hash(token)
        stored = self._by_hash.get(digest)
        # The dict lookup only tells digests apart; the final comparison is constant-time.
        if stored is None or not hmac.compare_digest(stored.key_hash, digest):
            return None
        self._last_used[stored.name] = self._clock.now()
        return frozenset(stored.scopes)

    # Managing ---------------------------------------------------------------------------------

    async def create(self, name: str, scopes: Iterable[object]) -> tuple[KeyInfo, str]:
        """A new key named `name` with `scopes`: (its listing, its text). The text is returned
        here only; ApiKeyError `invalid_name`, `invalid_scope` or `key_exists`."""
        if not NAME_RE.fullmatch(name):
            raise ApiKeyError("invalid_name", "a key name is 1..64 letters, digits, '_', '.' "
                              "or '-', starting with a letter or digit")
        checked = check_scopes(scopes)
        text = PREFIX + secrets.token_urlsafe(KEY_BYTES)
        stored = StoredKey(name, key_hash(text), checked, self._clock.now())
        if not await self._db.write(partial(key_store.insert, key=stored)):
            raise ApiKeyError("key_exists", f"a key named {name!r} exists; revoke it first")
        self._by_hash[stored.key_hash] = stored
        log.info("API key %r created with scopes %s", name, ",".join(checked))
        return self._info(stored), text

    async def revoke(self, name: str) -> bool:
        """Refuse the key `name` from now on and delete it; False when there is none."""
        for digest, stored in list(self._by_hash.items()):
            if stored.name == name:
                del self._by_hash[digest]
        for times in (self._last_used, self._written, self._write_time):
            times.pop(name, None)
        deleted = await self._db.write(partial(key_store.delete, name=name))
        if deleted:
            log.info("API key %r revoked", name)
        return deleted

    def listing(self) -> list[KeyInfo]:
        """Every key by name, with its newest last use (also the one not yet written)."""
        return sorted((self._info(s) for s in self._by_hash.values()), key=lambda k: k.name)

    def _info(self, stored: StoredKey) -> KeyInfo:
        return KeyInfo(stored.name, stored.scopes, stored.created_at,
                       self._last_used.get(stored.name, stored.last_used_at))

    async def flush(self, force: bool = False) -> int:
        """Write the last-use times of keys used since their last write, leaving out keys
        written less than touch_interval_s ago unless `force`; returns how many were written."""
        now = self._clock.now()
        due = {name: at for name, at in self._last_used.items()
               if at != self._written.get(name)
               and (force or now - self._write_time.get(name, -self._interval_s)
                    >= self._interval_s)}
        if not due:
            return 0
        await self._db.write(partial(key_store.touch, used=due))
        self._written.update(due)
        self._write_time.update(dict.fromkeys(due, now))
        return len(due)
