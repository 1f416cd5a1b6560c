"""The OA webhook (WeChat's callback URL): verify, decrypt, parse, deduplicate, store, answer.

tornado.web handlers over wxd.wechat.crypto/messages and wxd.store.inbox/db; imports no service
module and does no event work itself: jobs in the inbox do it later (events.py). The one
exception is an injected Replier (QR link codes): it may link and choose a passive reply
after the message is stored and before the answer.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import tornado.web
from tornado.routing import URLSpec

from wxd.clock import SYSTEM_CLOCK, Clock
from wxd.errors import DecryptError, MessageError, StorageError
from wxd.metrics import Registry
from wxd.store import inbox
from wxd.store.callbacks import OFF, Outbox
from wxd.store.db import Database
from wxd.wechat.crypto import MessageCrypto, check_signature
from wxd.wechat.messages import Message, parse_message, parse_xml, render_text_reply

log = logging.getLogger(__name__)

_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
_LABEL_RE = re.compile(r"[A-Za-z0-9_]{1,40}")
_SUCCESS = b"success"
# Requests waiting for their commit from which the webhook counts as busy (a burst, not the
# one or two a normal account has in flight), and for how long after (each commit answers all
# its waiting requests at once: the count drops to 0 between commits of a burst).
BUSY_WAITING = 8
BUSY_HOLD_S = 0.25

class NonceMemory:
    """Remembers each signed request's (timestamp, nonce, signature) until its timestamp leaves
    the replay window, with a digest of the body that came with it.

    Why not refuse every repeat: WeChat retries a request it got no answer to within 5 s with
    the same URL and body (the sandbox's WebhookSender does the same), possibly while the first
    attempt is still running; that retry must get `success`. So an identical repeat goes through
    and ends as a duplicate of the stored message (the dedupe key makes it a no-op), while the
    same signed query with another body (plain mode's signature does not cover the body) is a
    replay and gets 403. Only requests whose signature verified are remembered, so without the
    token nobody can fill it; `capacity` still bounds it (the oldest entries go first).
    """

    def __init__(self, window_s: float, capacity: int = 200_000) -> None:
        self._window_s = window_s
        self._capacity = capacity
        self._seen: dict[tuple[str, str, str], bytes] = {}
        self._expiry: deque[tuple[float, tuple[str, str, str]]] = deque()

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, key: tuple[str, str, str], digest: bytes, timestamp: int,
              now: float) -> bool | None:
        """None: first sighting (now remembered). True: the identical request again (WeChat's
        retry, or a replay that can only hit the dedupe key). False: the same signed query with
        a different body, i.e. a captured signature reused for forged content."""
        self._expire(now)
        known = self._seen.get(key)
        if known is not None:
            return known == digest
        if len(self._seen) >= self._capacity:
            _, oldest = self._expiry.popleft()
            self._seen.pop(oldest, None)
        self._seen[key] = digest
        self._expiry.append((timestamp + self._window_s, key))
        return None

    def _expire(self, now: float) -> None:
        # Arrival order is close to timestamp order; an entry stuck behind a later one only
        # lives a little longer than needed.
        while self._expiry and self._expiry[0][0] < now:
            _, key = self._expiry.popleft()
            self._seen.pop(key, None)


class Replier(Protocol):
    """Chooses a passive reply for a stored message (qrlinks.QrLinks satisfies it): the text
    of a text reply, or None for plain `success`. Called for new and duplicate messages alike
    (a WeChat retry must get the same reply), so it must be idempotent."""

    async def reply_to(self, message: Message) -> str | None: ...


class Rejected(tornado.web.HTTPError):
    """A refused webhook request: `result` is the metrics label, the message is safe to log."""

    def __init__(self, status: int, result: str, detail: str) -> None:
        super().__init__(status, log_message=detail)
        self.result = result
        self.detail = detail


class Webhook:
    """Everything the handler needs: checks, the store, the doorbell and the metrics.

    `token` is the webhook Token; `crypto` is None when no EncodingAESKey is configured (then an
    `encrypt_type=aes` request is refused with 400). With a key, plaintext requests are still
    accepted unless `require_encryption`: the console's mode switch (plain → compatible → safe)
    is not known here. Plain mode's signature does not cover the body, so with a key configured
    `require_encryption=True` also closes a downgrade by an active man in the middle.
    `replay_window_s` bounds |now - timestamp|; `max_body_bytes` bounds the body (413).
    `on_stored()` is called after a new message is committed (the event workers' doorbell).
    `replier` (None = always `success`) may answer a stored message with a passive text reply,
    encrypted when the request was (safe and compatible mode).
    With an `outbox` that wants message.received, a message no other callback type reports is
    committed with its callback (and the outbox's doorbell rung). `busy()` is True while
    BUSY_WAITING or more requests wait for their commit, and BUSY_HOLD_S after: less urgent
    work (callback delivery) holds back then, since WeChat gives the answer 5 seconds.
    """

    def __init__(
        self,
        token: str,
        crypto: MessageCrypto | None,
        db: Database,
        *,
        replay_window_s: float = 300.0,
        max_body_bytes: int = 65536,
        clock: Clock = SYSTEM_CLOCK,
        metrics: Registry | None = None,
        on_stored: Callable[[], None] | None = None,
        require_encryption: bool = False,
        nonce_capacity: int = 200_000,
        replier: Replier | None = None,
        outbox: Outbox = OFF,
    ) -> None:
        self.token = token
        self.crypto = crypto
        self.db = db
        self.replay_window_s = replay_window_s
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        self.on_stored = on_stored
        self.outbox = outbox
        self._relay = outbox.wants("message.received")
        self.waiting = 0  # requests waiting for their commit
        self._busy_at = -BUSY_HOLD_S  # monotonic s when `waiting` last reached BUSY_WAITING
        self.require_encryption = require_encryption and crypto is not None
        self.nonces = NonceMemory(replay_window_s, nonce_capacity)
        self.replier = replier
        registry = metrics if metrics is not None else Registry()
        self.requests = registry.counter(
            "wxd_webhook_requests_total",
            "Webhook requests by result (accepted, duplicate, echo, or the rejection reason).",
            ("result",),
        )
        self.events = registry.counter(
            "wxd_webhook_events_total", "Newly stored webhook messages by Event or MsgType.",
            ("type",),
        )

    def busy(self) -> bool:
        return (self.waiting >= BUSY_WAITING
                or self.clock.monotonic() - self._busy_at < BUSY_HOLD_S)

    def __repr__(self) -> str:
        mode = "aes" if self.crypto is not None else "plain"
        return f"Webhook(mode={mode}, window={self.replay_window_s}s)"

    # Checks, in the order they run. Each raises Rejected; none keeps state for a rejection
    # except the nonce memory, which only ever holds requests with a valid signature.

    def check_query(self, signature: str, timestamp: str, nonce: str) -> int:
        """URL signature over (token, timestamp, nonce), then the replay window. Returns the
        timestamp as int."""
        if not check_signature(signature, self.token, timestamp, nonce):
            raise Rejected(403, "bad_signature", "signature mismatch")
        if not _TIMESTAMP_RE.fullmatch(timestamp):
            raise Rejected(403, "bad_timestamp", "timestamp is not a number")
        ts = int(timestamp)
        if abs(self.clock.now() - ts) > self.replay_window_s:
            raise Rejected(403, "stale_timestamp", "timestamp outside the replay window")
        return ts

    def check_size(self, content_length: str | None, body: bytes) -> None:
        declared = content_length.strip() if content_length else ""
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise Rejected(413, "too_large", f"Content-Length {declared} over the limit")
        if len(body) > self.max_body_bytes:
            raise Rejected(413, "too_large", f"body of {len(body)} bytes over the limit")

    def check_nonce(self, signature: str, timestamp: str, nonce: str, ts: int,
                    body: bytes) -> bool:
        """True when this exact request was seen before (WeChat's retry of it)."""
        digest = hashlib.blake2b(body, digest_size=16).digest()
        seen = self.nonces.check((timestamp, nonce, signature), digest, ts, self.clock.now())
        if seen is False:
            raise Rejected(403, "replayed_nonce", "nonce reused with a different body")
        return bool(seen)

    def read_message(self, body: bytes, encrypt_type: str, msg_signature: str,
                     timestamp: str, nonce: str) -> Message:
        """The typed message of a POST body in plain, compatible or safe mode.

        With encrypt_type=aes the inner message is used (compatible mode's plaintext copy is
        ignored): msg_signature over Encrypt is checked before anything is decrypted.
        """
        fields = self._fields(body, "")
        if encrypt_type == "aes":
            if self.crypto is None:
                raise Rejected(400, "not_configured", "encrypted message but no EncodingAESKey")
            encrypt = fields.get("Encrypt", "")
            if not encrypt:
                raise Rejected(400, "bad_message", "no Encrypt element")
            if not self.crypto.check_msg_signature(msg_signature, timestamp, nonce, encrypt):
                raise Rejected(403, "bad_msg_signature", "msg_signature mismatch")
            try:
                inner = self.crypto.decrypt(encrypt)
            except DecryptError as exc:
                raise Rejected(400, "decrypt_error", str(exc)) from None
            fields = self._fields(inner.encode("utf-8"), "inner message: ")
        elif encrypt_type not in ("", "raw"):
            raise Rejected(400, "bad_encrypt_type", "unknown encrypt_type")
        elif self.require_encryption:
            raise Rejected(400, "not_encrypted", "plaintext message but encryption is required")
        try:
            return parse_message(fields)
        except MessageError as exc:
            raise Rejected(400, "bad_message", str(exc)) from None

    def _fields(self, data: bytes, what: str) -> dict[str, str]:
        try:
            return parse_xml(data, self.max_body_bytes)
        except MessageError as exc:
            raise Rejected(400, "bad_message", f"{what}{exc}") from None

    async def store(self, message: Message) -> bool:
        """Commit the message (and its job) durably; False for a duplicate. Rings the doorbell,
        unless a replier is set: then the handler rings it once the reply is chosen (ring()),
        so that the event job's backstop pass over a QR scene finds the link made instead of
        racing the webhook's own pass.

        Messages arriving together are inserted by one store_prepared call (one multi-row
        INSERT) through the database's batched write. A fault of the database answers 503
        (WeChat retries, and the dedupe key keeps that harmless); any other exception is a bug
        and propagates with its traceback.
        """
        prepared = inbox.prepare(message, self.clock.now(), relay=self._relay)
        self.waiting += 1
        if self.waiting >= BUSY_WAITING:
            self._busy_at = self.clock.monotonic()
        try:
            stored = await self.db.write_many(inbox.store_prepared, prepared)
        except StorageError as exc:
            self.requests.inc(result="storage_error")
            raise Rejected(503, "storage_error", f"not stored: {exc}") from None
        finally:
            self.waiting -= 1
        if stored:
            self.requests.inc(result="accepted")
            kind = message.event or message.msg_type
            self.events.inc(type=kind if _LABEL_RE.fullmatch(kind) else "other")
            if self.replier is None:
                self.ring()
            if prepared.callback is not None and self.outbox.notify is not None:
                self.outbox.notify()
        else:
            self.requests.inc(result="duplicate")
        return stored

    def ring(self) -> None:
        """Call on_stored (the event workers' doorbell)."""
        if self.on_stored is not None:
            self.on_stored()

    async def answer(self, message: Message, encrypted: bool, nonce: str) -> bytes:
        """What to answer a stored message: `success`, or the replier's passive text reply
        (https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Passive_user_reply_message.html),
        encrypted with a fresh timestamp and the request's nonce when the request was. A fault
        of the database answers 503 (WeChat retries; the replier is idempotent)."""
        if self.replier is None:
            return _SUCCESS
        try:
            text = await self.replier.reply_to(message)
        except StorageError as exc:
            self.requests.inc(result="storage_error")
            raise Rejected(503, "storage_error", f"no reply: {exc}") from None
        if not text:
            return _SUCCESS
        now = int(self.clock.now())
        # The reply swaps the request's FromUserName and ToUserName.
        xml = render_text_reply(message.from_user, message.to_user, text, now)
        if encrypted and self.crypto is not None:
            safe_nonce = nonce if nonce and "]]>" not in nonce else str(now)
            xml = self.crypto.encrypt_reply(xml, str(now), safe_nonce)
        self.requests.inc(result="replied")
        return xml.encode("utf-8")


class WebhookHandler(tornado.web.RequestHandler):
    """GET: URL verification (echostr). POST: a message or event; answers `success` once stored.

    Every check runs in prepare() and raises (never writes then returns), so a refused request
    never reaches get()/post().
    """

    SUPPORTED_METHODS = ("GET", "POST")

    def initialize(self, webhook: Webhook) -> None:
        self.webhook = webhook
        self.message: Message | None = None

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")

    def check_xsrf_cookie(self) -> None:
        """WeChat's POSTs carry no cookies; the signature is the authentication."""

    def _arg(self, name: str) -> str:
        values = self.request.query_arguments.get(name)
        if not values:
            return ""
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected(400, "bad_query", f"{name} is not UTF-8") from None

    def prepare(self) -> None:
        hook = self.webhook
        request = self.request
        try:
            if request.method == "POST":
                hook.check_size(request.headers.get("Content-Length"), request.body)
            signature, timestamp, nonce = self._arg("signature"), self._arg("timestamp"), \
                self._arg("nonce")
            ts = hook.check_query(signature, timestamp, nonce)
            if request.method == "POST":
                hook.check_nonce(signature, timestamp, nonce, ts, request.body)
                self.message = hook.read_message(
                    request.body, self._arg("encrypt_type").lower(), self._arg("msg_signature"),
                    timestamp, nonce,
                )
        except Rejected as exc:
            hook.requests.inc(result=exc.result)
            raise

    def get(self) -> None:
        self.webhook.requests.inc(result="echo")
        # For the OA the echostr is plaintext in every mode:
        # https://developers.weixin.qq.com/doc/offiaccount/Basic_Information/Access_Overview.html
        self.finish(self._arg("echostr"))

    async def post(self) -> None:
        if self.message is None:  # prepare() sets it or raises
            raise tornado.web.HTTPError(500, "no message after prepare()")
        hook = self.webhook
        stored = await hook.store(self.message)
        encrypted = self._arg("encrypt_type").lower() == "aes"
        try:
            answer = await hook.answer(self.message, encrypted, self._arg("nonce"))
        finally:
            if stored and hook.replier is not None:
                hook.ring()
        if answer is not _SUCCESS:
            self.set_header("Content-Type", "application/xml; charset=utf-8")
        self.finish(answer)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish(f"{status_code} {self._reason}\n")

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        if isinstance(value, Rejected):
            # One line; never the body or the query string (openid, signatures).
            log.warning("webhook %s %s from %s refused: %d %s: %s", self.request.method,
                        self.request.path, self.request.remote_ip, value.status_code,
                        value.result, value.detail)
            return
        super().log_exception(typ, value, tb)


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log without query strings; refusals are already logged once by the handler."""
    status = handler.get_status()
    level = logging.ERROR if status >= 500 else logging.DEBUG
    if log.isEnabledFor(level):
        log.log(level, "%d %s %s (%s) %.1fms", status, handler.request.method,
                handler.request.path, handler.request.remote_ip,
                1000.0 * handler.request.request_time())


def routes(path: str, webhook: Webhook) -> list[URLSpec]:
    """The webhook's single route; `path` is [webhook] path (e.g. /wechat)."""
    return [tornado.web.url(re.escape(path), WebhookHandler, {"webhook": webhook})]


def make_app(path: str, webhook: Webhook, extra: Sequence[URLSpec] = ()) -> tornado.web.Application:
    """A tornado Application serving the webhook (the public listener), plus `extra` routes
    of other public pages (the OAuth link pages)."""
    return tornado.web.Application(
        [*routes(path, webhook), *extra], log_function=log_request, compress_response=False,
        xheaders=False,
    )
