"""QR link codes: an MP user gets a temporary parametric QR code of the OA; whoever scans it
(following it, or already a follower) is linked to that MP user with source "qrcode". Optional
confirmations: a passive text reply, and a Mini Program card by customer-service message (a
durable job, run by the event workers).

Imports base modules, wxd.wechat and the store only; the OA API arrives as a constructor
argument typed with a Protocol. Used by the webhook (reply_to, before it answers) and by the
event router (on_scan, as a backstop after a lost answer): both paths are idempotent.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sqlite3
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from wxd.clock import SYSTEM_CLOCK, Clock
from wxd.errors import MessageError
from wxd.metrics import Registry
from wxd.store import jobs as job_store
from wxd.store import links
from wxd.store.callbacks import OFF, Outbox
from wxd.store.db import Database
from wxd.store.identity import ExplicitLink
from wxd.wechat.messages import Message, ScanEvent, SubscribeEvent
from wxd.wechat.oa import QRCODE_MAX_EXPIRE_S
from wxd.wechat.weburls import SHOWQRCODE_BASE, showqrcode_url

log = logging.getLogger(__name__)

# The job kind of the customer-service card; payload {"code_id", "oa_openid", "at"}.
CARD_JOB = "link_card"
DEFAULT_EXPIRES_S = 600
MIN_EXPIRES_S = 60
MAX_EXPIRES_S = QRCODE_MAX_EXPIRE_S
# After a follow or a scan WeChat allows 3 customer-service messages within 1 minute:
# https://developers.weixin.qq.com/doc/offiaccount/Customer_Service/Customer_Service_Messages.html
CARD_WINDOW_S = 60.0
# wxd's scenes: a fixed prefix and 28 random letters/digits (about 166 bits): unguessable, and
# told apart from the operator's own campaign codes without a database read. scene_str may be
# up to 64 characters.
SCENE_PREFIX = "wxdl"
_SCENE_RE = re.compile(SCENE_PREFIX + r"[A-Za-z0-9]{28}")
_ALNUM = string.ascii_letters + string.digits
# The series both kinds of link codes count in (oauth_links declares it alike).
LINK_CODES_METRIC = "wxd_link_codes_total"
LINK_CODES_HELP = ("Link-code events by kind (qrcode, oauth) and outcome (created, linked, "
                   "repeat, used, expired, unknown, conflict, ...).")


def new_secret(length: int) -> str:
    """`length` random letters and digits from the system's CSPRNG."""
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def new_code_id(prefix: str) -> str:
    """A public link-code id: prefix + 20 URL-safe characters."""
    return prefix + secrets.token_urlsafe(15)


def is_our_scene(scene: str | None) -> bool:
    """True for a scene wxd could have created (the event may still name no stored code)."""
    return scene is not None and _SCENE_RE.fullmatch(scene) is not None


class QrCodeAPI(Protocol):
    """What QrLinks needs from wechat.OfficialAccountAPI."""

    async def create_qrcode(self, scene_str: str, expire_seconds: int) -> dict[str, Any]: ...

    async def send_custom(self, body: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class CardSettings:
    """The Mini Program card sent after a QR link: [linking] qrcode_card_* and the MP appid."""

    thumb_media_id: str
    pagepath: str
    title: str
    mp_appid: str


class QrLinks:
    """Creates QR link codes and links the people who scan them.

    `image_base` is where showqrcode is served (wechat.weburls.web_bases). `reply_text` is the
    passive reply after a link ("" = none). `card` (None = none) is sent by a CARD_JOB job
    queued in the link's own transaction; `on_job` (the event workers' doorbell) is rung after.
    A link made (or replaced) writes its user.linked (user.unlinked) callback through `outbox`
    in that transaction too (links.bind).
    """

    def __init__(self, db: Database, api: QrCodeAPI, *, image_base: str = SHOWQRCODE_BASE,
                 reply_text: str = "", card: CardSettings | None = None,
                 clock: Clock = SYSTEM_CLOCK, metrics: Registry | None = None,
                 on_job: Callable[[], None] | None = None, outbox: Outbox = OFF) -> None:
        self._db = db
        self._outbox = outbox
        self._api = api
        self._image_base = image_base
        self._reply_text = reply_text
        self._card = card
        self._clock = clock
        self._on_job = on_job
        registry = metrics if metrics is not None else Registry()
        self._outcomes = registry.counter(LINK_CODES_METRIC, LINK_CODES_HELP, ("kind", "outcome"))

    async def create(self, mp_openid: str, expires_in: int = DEFAULT_EXPIRES_S) -> dict[str, Any]:
        """Create a temporary QR_STR_SCENE code for `mp_openid` valid `expires_in` seconds
        (MIN_EXPIRES_S..MAX_EXPIRES_S, ValueError otherwise) and store it: the 201 answer
        {"id", "scene", "ticket", "url", "image_url", "expires_at", "status": "pending"}. The
        expiry is computed from the request, not from WeChat's answer (reported as 0 once).
        WeChatAPIError / TransportError when WeChat refuses or cannot be reached.
        """
        if not MIN_EXPIRES_S <= expires_in <= MAX_EXPIRES_S:
            raise ValueError(f"expires_in must be {MIN_EXPIRES_S}..{MAX_EXPIRES_S} seconds")
        scene = SCENE_PREFIX + new_secret(28)
        started = self._clock.now()
        answer = await self._api.create_qrcode(scene, expires_in)
        ticket = str(answer["ticket"])
        url = answer.get("url")
        code = links.LinkCode(
            id=new_code_id("lq_"), kind="qrcode", mp_openid=mp_openid, token=scene,
            created_at=started, expires_at=started + expires_in, ticket=ticket,
            qr_url=url if isinstance(url, str) else None)
        await self._db.write(lambda conn: links.create_code(conn, code))
        self._outcomes.inc(kind="qrcode", outcome="created")
        log.info("QR link code %s created for MP user %s (valid %d s)", code.id, mp_openid,
                 expires_in)
        return {"id": code.id, "scene": scene, "ticket": ticket, "url": code.qr_url,
                "image_url": showqrcode_url(ticket, self._image_base),
                "expires_at": code.expires_at, "status": "pending"}

    async def status(self, code_id: str) -> dict[str, Any] | None:
        """{"id", "status": pending|linked|expired, "oa_openid"?, "linked_at"?, ...} or None."""
        found = await self._db.read(lambda conn: links.code(conn, code_id))
        if found is None or found.kind != "qrcode":
            return None
        return found.to_json(self._clock.now())

    async def reply_to(self, message: Message) -> str | None:
        """The webhook's hook, called after the message is stored and before it answers: link
        a subscribe/SCAN carrying one of wxd's scenes, then the passive reply text when the
        scan linked (or had linked) its person and [linking] qrcode_reply is set; else None
        (the webhook answers `success`). StorageError propagates (the webhook answers 503 and
        WeChat retries)."""
        scene, ticket = _scene_of(message)
        if scene is None or not is_our_scene(scene):
            return None
        outcome = await self.on_scan(message.from_user, scene, ticket,
                                     float(message.create_time))
        if outcome in ("linked", "repeat") and self._reply_text:
            return self._reply_text
        return None

    async def on_scan(self, oa_openid: str, scene: str, ticket: str, at: float, *,
                      backstop: bool = False) -> str:
        """Link the MP user of the code whose scene this is to `oa_openid`, as scanned at `at`
        (the event's CreateTime; unix s). Returns the outcome: "not_ours" (not a wxd scene),
        "unknown", "expired", "used" (the code linked someone else), "repeat" (it already
        linked this person: WeChat's retry, a second scan), "conflict" (a unionid link
        disagrees), "linked". Refusals are logged and counted (with `backstop`, the event job
        repeating what the webhook already did: logged at debug, not counted); the follow
        itself is recorded elsewhere."""
        if not is_our_scene(scene):
            return "not_ours"
        now = self._clock.now()
        when = min(at, now)
        card = self._card

        def apply(conn: sqlite3.Connection) -> tuple[links.LinkCode | None, links.Redeemed | None]:
            found = links.code_by_token(conn, "qrcode", scene)
            if found is None:
                return None, None
            redeemed = links.redeem(conn, found.id, oa_openid, when, now, outbox=self._outbox)
            if redeemed is not None and redeemed.outcome == "linked" and card is not None:
                payload = json.dumps({"code_id": found.id, "oa_openid": oa_openid, "at": when})
                job_store.enqueue(conn, CARD_JOB, [(payload, now)])
            return found, redeemed

        found, redeemed = await self._db.write(apply)
        quiet = logging.DEBUG if backstop else logging.INFO
        if found is None or redeemed is None:
            log.log(quiet, "scan by %s names an unknown QR link scene; nothing linked", oa_openid)
            return "unknown" if backstop else self._count("unknown")
        outcome = redeemed.outcome
        if outcome == "linked":
            bound = redeemed.bound
            replaced = list(bound.replaced) if bound is not None else []
            if ticket and found.ticket and ticket != found.ticket:
                log.info("QR link code %s: the event's Ticket differs from the one created",
                         found.id)
            log.info("linked MP user %s to OA openid %s by QR code %s%s", found.mp_openid,
                     oa_openid, found.id, _replaced_text(replaced))
            if card is not None and self._on_job is not None:
                self._on_job()
        elif outcome == "repeat":
            log.debug("QR link code %s scanned again by the person it linked", found.id)
        elif outcome == "conflict":
            reason = redeemed.bound.conflict if redeemed.bound else None
            log.log(quiet, "QR link code %s scanned by %s: link_conflict (%s); nothing linked",
                    found.id, oa_openid, reason)
        else:
            log.log(quiet, "QR link code %s scanned by %s is %s; nothing linked", found.id,
                    oa_openid, outcome)
        if backstop and outcome != "linked":
            return outcome  # the webhook's own pass counted it
        return self._count(outcome)

    def _count(self, outcome: str) -> str:
        self._outcomes.inc(kind="qrcode", outcome=outcome)
        return outcome

    async def send_card(self, payload: Mapping[str, object]) -> str:
        """The CARD_JOB job: send the Mini Program card to the person a QR code linked, while
        WeChat's window after the scan is open (a job that runs later, after retries or a
        restart, is dropped as "card_window_closed": WeChat would answer 45015). Errors
        propagate to the event workers (45015/45047 are terminal: the job fails at once)."""
        card = self._card
        oa_openid, at = payload.get("oa_openid"), payload.get("at")
        if not isinstance(oa_openid, str) or not isinstance(at, (int, float)):
            raise MessageError("link card job payload lacks oa_openid/at")
        if card is None:
            return "card_disabled"
        if self._clock.now() - float(at) > CARD_WINDOW_S:
            log.warning("Mini Program card for %s not sent: WeChat's window after the scan "
                        "has closed", oa_openid)
            return "card_window_closed"
        await self._api.send_custom({
            "touser": oa_openid, "msgtype": "miniprogrampage",
            "miniprogrampage": {"title": card.title, "appid": card.mp_appid,
                                "pagepath": card.pagepath,
                                "thumb_media_id": card.thumb_media_id},
        })
        return "card_sent"


def _scene_of(message: Message) -> tuple[str | None, str]:
    """(scene, ticket) of a QR subscribe (EventKey without "qrscene_") or a SCAN (EventKey)."""
    if isinstance(message, SubscribeEvent):
        return message.scene, message.ticket
    if isinstance(message, ScanEvent):
        return message.event_key, message.ticket
    return None, ""


def _replaced_text(replaced: list[ExplicitLink]) -> str:
    if not replaced:
        return ""
    return " (replacing " + ", ".join(
        f"the earlier {old.source} link {old.mp_openid} -> {old.oa_openid}" for old in replaced) + ")"
