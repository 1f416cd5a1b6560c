"""The WeChat side of the webhook: builds signed (and encrypted) event requests and POSTs them.

Imports only stdlib, tornado.httpclient, wxd.wechat.crypto, wxd.wechat.messages and the sandbox's population.
"""

from __future__ import annotations

import logging
import random
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from wxd.sandbox.population import Credentials
from wxd.wechat.crypto import MessageCrypto, sign
from wxd.wechat.messages import render_event_xml

logger = logging.getLogger(__name__)

# WeChat waits 5 s for an answer; with none it retries, "a maximum of three retries".
# https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Passive_user_reply_message.html
WECHAT_TIMEOUT_S = 5.0
WECHAT_RETRIES = 3

Fields = Mapping[str, str | int]


@dataclass(frozen=True)
class SignedRequest:
    """One webhook request exactly as WeChat would send it."""

    url: str
    query: dict[str, str]
    body: bytes
    xml: str  # the plaintext message (inside Encrypt in safe mode)


@dataclass(frozen=True)
class Delivery:
    """The integrator's answer. `status` is None when no answer came (timeout, refused, reset);
    `attempts` counts the requests sent, retries included."""

    status: int | None
    body: bytes
    attempts: int
    error: str | None = None


class WebhookSender:
    """Signs, optionally encrypts, and POSTs events to a webhook URL the way WeChat does.

    `mode` is "plain", "compat" (plaintext fields plus <Encrypt>) or "safe" (ToUserName and
    Encrypt only). Every request carries signature, timestamp, nonce and openid; compat/safe add
    encrypt_type=aes and msg_signature. With `retries`, a request that gets no answer within
    `timeout_s` is sent again with the same URL and body, up to WECHAT_RETRIES more times.
    `random_prefix` replaces the 16 random bytes of the encryption (known-answer tests only).
    Call `close()` when done: it closes the HTTP client the sender created.
    """

    def __init__(
        self,
        url: str,
        credentials: Credentials | None = None,
        mode: str = "plain",
        *,
        retries: bool = False,
        timeout_s: float = WECHAT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
        random_prefix: Callable[[], bytes] | None = None,
        http_client: AsyncHTTPClient | None = None,
    ) -> None:
        if mode not in ("plain", "compat", "safe"):
            raise ValueError(f"mode must be plain, compat or safe, got {mode!r}")
        self.url = url
        self.credentials = credentials if credentials is not None else Credentials()
        self.mode = mode
        self.retries = retries
        self.timeout_s = timeout_s
        self._clock = clock
        self._rng = random.Random(f"{seed}:webhook")
        self._random_prefix = random_prefix
        self.last_msg_id: int | None = None  # the MsgId of the latest text message built
        self._client = http_client
        self._owns_client = http_client is None
        creds = self.credentials
        self._crypto = (
            MessageCrypto(creds.webhook_token, creds.encoding_aes_key, creds.oa_appid)
            if mode != "plain"
            else None
        )

    # Message fields ------------------------------------------------------------------------

    def _header(self, openid: str, msg_type: str, create_time: int | None) -> dict[str, str | int]:
        return {
            "ToUserName": self.credentials.oa_original_id,
            "FromUserName": openid,
            "CreateTime": create_time if create_time is not None else int(self._clock()),
            "MsgType": msg_type,
        }

    def subscribe_fields(
        self,
        openid: str,
        scene: str | None = None,
        ticket: str | None = None,
        create_time: int | None = None,
    ) -> dict[str, str | int]:
        """A follow; through a parametric QR code EventKey is "qrscene_<scene>" plus Ticket."""
        fields = self._header(openid, "event", create_time)
        fields["Event"] = "subscribe"
        # Plain follows arrive with an empty EventKey element (community logs; the official sample
        # has none):
        # https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Receiving_event_pushes.html
        fields["EventKey"] = f"qrscene_{scene}" if scene is not None else ""
        if scene is not None:
            fields["Ticket"] = ticket or self._ticket()
        return fields

    def unsubscribe_fields(self, openid: str, create_time: int | None = None) -> dict[str, str | int]:
        fields = self._header(openid, "event", create_time)
        fields["Event"] = "unsubscribe"
        fields["EventKey"] = ""
        return fields

    def scan_fields(
        self, openid: str, scene: str, ticket: str | None = None, create_time: int | None = None
    ) -> dict[str, str | int]:
        """An already-following user scans a QR: Event "SCAN" (upper case), EventKey without
        the qrscene_ prefix.
        https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Receiving_event_pushes.html"""
        fields = self._header(openid, "event", create_time)
        fields.update(Event="SCAN", EventKey=scene, Ticket=ticket or self._ticket())
        return fields

    def text_fields(
        self, openid: str, content: str, msg_id: int | None = None, create_time: int | None = None
    ) -> dict[str, str | int]:
        """A text message; MsgId is drawn unless given. Passing the MsgId of another user's
        message (`last_msg_id`) makes the collision reported across users:
        https://github.com/binarywang/WxJava/issues/333"""
        fields = self._header(openid, "text", create_time)
        fields["Content"] = content
        fields["MsgId"] = msg_id if msg_id is not None else self._rng.getrandbits(63)
        self.last_msg_id = int(fields["MsgId"])
        return fields

    def template_finished_fields(
        self, openid: str, msgid: int | None, status: str, create_time: int | None = None
    ) -> dict[str, str | int]:
        """TEMPLATESENDJOBFINISH: note "MsgID" with a capital D, unlike MsgId elsewhere.
        https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html
        `msgid` None leaves the MsgID element out; a report with MsgID 0 has been seen too:
        https://developers.weixin.qq.com/community/personal/oCJUswwJ54BzNN0XkUvQKH5XOkCk/question"""
        fields = self._header(openid, "event", create_time)
        fields["Event"] = "TEMPLATESENDJOBFINISH"
        if msgid is not None:
            fields["MsgID"] = msgid
        fields["Status"] = status
        return fields

    def _ticket(self) -> str:
        return f"gQ{self._rng.getrandbits(160):040x}"

    def _nonce(self) -> str:
        return str(self._rng.randrange(10**8, 10**10))

    # Signing and encryption --------------------------------------------------------------------

    def build(
        self, fields: Fields, timestamp: int | None = None, nonce: str | None = None
    ) -> SignedRequest:
        """Sign (and encrypt per mode) one message; `fields` must include FromUserName."""
        token = self.credentials.webhook_token
        ts = str(timestamp if timestamp is not None else int(self._clock()))
        nonce = nonce if nonce is not None else self._nonce()
        xml = render_event_xml(fields)
        query = {
            "signature": sign(token, ts, nonce),
            "timestamp": ts,
            "nonce": nonce,
            "openid": str(fields["FromUserName"]),
        }
        if self._crypto is None:
            body = xml
        else:
            prefix = self._random_prefix() if self._random_prefix is not None else None
            if prefix is None:
                prefix = self._rng.randbytes(16)
            encrypt = self._crypto.encrypt(xml, random_prefix=prefix)
            query["encrypt_type"] = "aes"
            query["msg_signature"] = sign(token, ts, nonce, encrypt)
            if self.mode == "compat":
                body = render_event_xml({**fields, "Encrypt": encrypt})
            else:
                body = render_event_xml(
                    {"ToUserName": self.credentials.oa_original_id, "Encrypt": encrypt}
                )
        return SignedRequest(self._with_query(query), query, body.encode("utf-8"), xml)

    def verification_url(
        self, echostr: str, timestamp: int | None = None, nonce: str | None = None
    ) -> str:
        """The GET URL WeChat uses to verify the server; echostr is plaintext in every mode."""
        ts = str(timestamp if timestamp is not None else int(self._clock()))
        nonce = nonce if nonce is not None else self._nonce()
        query = {
            "signature": sign(self.credentials.webhook_token, ts, nonce),
            "echostr": echostr,
            "timestamp": ts,
            "nonce": nonce,
        }
        return self._with_query(query)

    def _with_query(self, query: Mapping[str, str]) -> str:
        separator = "&" if "?" in self.url else "?"
        return self.url + separator + urllib.parse.urlencode(query)

    # Sending -------------------------------------------------------------------------------------

    def _http(self) -> AsyncHTTPClient:
        if self._client is None:
            self._client = AsyncHTTPClient(force_instance=True)
        return self._client

    async def _fetch(self, url: str, method: str, body: bytes | None) -> Delivery:
        attempts = 0
        limit = 1 + (WECHAT_RETRIES if self.retries else 0)
        error = ""
        while attempts < limit:
            attempts += 1
            request = HTTPRequest(
                url,
                method=method,
                body=body,
                headers={"Content-Type": "text/xml"} if body is not None else None,
                request_timeout=self.timeout_s,
                connect_timeout=self.timeout_s,
                follow_redirects=False,
            )
            try:
                response = await self._http().fetch(request, raise_error=False)
            except (HTTPClientError, OSError) as exc:  # 599 timeout, refused, reset
                error = f"{type(exc).__name__}: {exc}"
                logger.info("webhook %s attempt %d got no answer: %s", method, attempts, error)
                continue
            return Delivery(response.code, response.body or b"", attempts)
        return Delivery(None, b"", attempts, error)

    async def send(self, request: SignedRequest) -> Delivery:
        """POST a built request (with WeChat's retries if enabled)."""
        return await self._fetch(request.url, "POST", request.body)

    async def post_fields(self, fields: Fields) -> Delivery:
        return await self.send(self.build(fields))

    async def verify(self, echostr: str = "4375120948345356249") -> Delivery:
        """The URL-verification GET; a correct server answers the echostr as the body."""
        return await self._fetch(self.verification_url(echostr), "GET", None)

    async def subscribe(
        self, openid: str, scene: str | None = None, ticket: str | None = None
    ) -> Delivery:
        return await self.post_fields(self.subscribe_fields(openid, scene, ticket))

    async def unsubscribe(self, openid: str) -> Delivery:
        return await self.post_fields(self.unsubscribe_fields(openid))

    async def scan(self, openid: str, scene: str, ticket: str | None = None) -> Delivery:
        return await self.post_fields(self.scan_fields(openid, scene, ticket))

    async def text(self, openid: str, content: str, msg_id: int | None = None) -> Delivery:
        return await self.post_fields(self.text_fields(openid, content, msg_id))

    async def template_finished(self, openid: str, msgid: int | None, status: str) -> Delivery:
        return await self.post_fields(self.template_finished_fields(openid, msgid, status))

    def close(self) -> None:
        """Close the HTTP client if this sender created it. Idempotent."""
        if self._client is not None and self._owns_client:
            self._client.close()
        self._client = None
