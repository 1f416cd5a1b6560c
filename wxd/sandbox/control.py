"""The emulator's JSON control API under /_sandbox/ (for demos, scripts and other processes).

Imports tornado.web, stdlib and the sandbox's own modules; never wxd's service layers.
Errors are {"error": "..."} with 400 or 404.

Fault switches (the HTTP form of FakeWeChat.script_fault and its shorthands; faults.py has the
whole contract):
- POST /_sandbox/faults {path, kind, times?, seconds?, until?, app?, openids? | openid?,
  next_openid?, ips? | ip?, errmsg?, allow?, per?, per_openid?} adds a rule and answers it as
  JSON (with its "id"). `path` is an API path, "token" (both token endpoints) or "*" (every
  API path). `times` absent: 1 without a time limit, no count limit with one; null: no count
  limit (with no time limit either, the rule lasts until cleared). `until` is an emulator time
  or "beijing_midnight" (the next daily-quota reset).
- GET /_sandbox/faults -> {"faults": [...]}: the rules still in force, with what they fired.
- DELETE /_sandbox/faults[?path=…][&id=…] -> {"cleared": <count>}: all rules, or some.
The shorthands as HTTP bodies:
- tokens refused: {"path": "token" (or "*" for business calls too), "kind": "40164" | "61004" |
  "89501" | "89503" | "89506" | "89507" | "40243" | "40125" | "40013", "seconds": T,
  "app"?: "oa" | "mp", "ips"?: [...]}
- stale backfill cursor: {"path": "/cgi-bin/user/get", "kind": "40003" | "empty" |
  "empty_bare", "next_openid": "<openid>" or "*", "times": null}
- a bad openid in a batchget chunk: {"path": "/cgi-bin/user/info/batchget", "kind": "50005" |
  "40003" | "40032", "openids": [...], "times": null}
- a repeated client_msg_id: {"path": "/cgi-bin/message/template/send", "kind": "dup:ok" |
  "dup:ok_no_msgid" | "dup:45065" | "dup:45065_msg_id" | "dup:45065_msgid" | "dup:40241" |
  "dup:45066", "times": null}
- daily quota: {"path": ..., "kind": "45009", "allow": N, "per": "day", "times": null}; quota
  already used up today: {"path": ..., "kind": "45009", "until": "beijing_midnight"}
- per-user limit: {"path": "/cgi-bin/message/template/send", "kind": "43117", "openids": [...],
  "seconds": T} or {..., "allow": N, "per": S, "per_openid": true, "times": null}
- delivery reports: {"path": "/cgi-bin/message/template/send", "kind": "report:msgid0" |
  "report:no_msgid" | "report:lost", "times": N}
Linking without unionid:
- POST /_sandbox/scan {who, ticket, duplicates?} -> what the scan made WeChat push (subscribe
  with qrscene_<scene>, SCAN, a plain subscribe for an expired code, or nothing) and the
  webhook's answers; `duplicates` sends the identical request that many more times, as WeChat
  does when its 5-second timer fires before the answer.
- GET /_sandbox/qrcodes -> {"qrcodes": [...]}: every code created, with ticket and scene.
- POST /_sandbox/oauth/authorize {who, url, snapshot?, decline?} -> {"location"} (the redirect
  the person's browser follows) or 400 {"error", "errcode"} (the page WeChat shows).
  POST /_sandbox/oauth/domain {"domain": ... | null}: the OA's web-authorization domain.
- GET /_sandbox/kefu/<oa_openid> -> {"messages": [...]}: customer-service messages received.
Other behaviours: POST /_sandbox/unfollow {who, "notify": false} is a silent unfollow (no
unsubscribe event; template/send then answers 43004). POST /_sandbox/events can send a
TEMPLATESENDJOBFINISH with any MsgID (0, or null for none) and text messages with a chosen
MsgId ("last": the previous text message's, i.e. a collision across users).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

import tornado.web

from wxd.sandbox.population import Person
from wxd.sandbox.runtime import SandboxRuntime
from wxd.sandbox.state import Call, FakeWeChat
from wxd.sandbox.webauth import Refused
from wxd.sandbox.webhook_sender import Delivery, WebhookSender


class _ControlError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def lookup_person(fake: FakeWeChat, spec: dict[str, Any]) -> Person | None:
    """The person named by index, oa_openid, mp_openid or unionid; None when unknown.
    ValueError when `spec` names nobody."""
    if isinstance(spec.get("index"), int):
        index = spec["index"]
        return fake.people[index] if 0 <= index < len(fake.people) else None
    if isinstance(spec.get("oa_openid"), str):
        return fake.by_oa_openid(spec["oa_openid"])
    if isinstance(spec.get("mp_openid"), str):
        return fake.by_mp_openid(spec["mp_openid"])
    if isinstance(spec.get("unionid"), str):
        return fake.by_unionid(spec["unionid"])
    raise ValueError("name a person by index, oa_openid, mp_openid or unionid")


def person_named(fake: FakeWeChat, text: str) -> Person | None:
    """The person whose index, OA openid, MP openid or unionid `text` is."""
    if text.isdigit():
        index = int(text)
        return fake.people[index] if index < len(fake.people) else None
    return fake.by_oa_openid(text) or fake.by_mp_openid(text) or fake.by_unionid(text)


def person_json(person: Person) -> dict[str, Any]:
    """A person as the control API shows it (session_key included: this is a test double)."""
    return dataclasses.asdict(person)


def call_json(call: Call) -> dict[str, Any]:
    """A logged call as the control API shows it (the body decoded, not the raw bytes)."""
    return {
        "method": call.method,
        "path": call.path,
        "query": call.query,
        "body": call.body,
        "status": call.status,
        "errcode": call.errcode,
        "at": call.at,
        "app": call.app,
        "fault": call.fault,
    }


def delivery_json(delivery: Delivery | None) -> dict[str, Any] | None:
    if delivery is None:
        return None
    return {
        "status": delivery.status,
        "body": delivery.body.decode("utf-8", "replace"),
        "attempts": delivery.attempts,
        "error": delivery.error,
    }


class ControlHandler(tornado.web.RequestHandler):
    """Base: JSON in/out and person lookup by index, oa_openid, mp_openid or unionid."""

    def initialize(self, runtime: SandboxRuntime) -> None:
        self.runtime = runtime
        self.fake = runtime.fake

    def check_xsrf_cookie(self) -> None:
        """No XSRF: a local JSON API for scripts."""

    def body_json(self) -> dict[str, Any]:
        if not self.request.body:
            return {}
        try:
            value = json.loads(self.request.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _ControlError(400, "body is not JSON") from None
        if not isinstance(value, dict):
            raise _ControlError(400, "body must be a JSON object")
        return value

    def find_person(self, spec: dict[str, Any]) -> Person:
        try:
            person = lookup_person(self.fake, spec)
        except ValueError as error:
            raise _ControlError(400, str(error)) from None
        if person is None:
            raise _ControlError(404, "no such person")
        return person

    def reply(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(value, ensure_ascii=False))

    async def _run(self, action: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        try:
            result = await action()
        except _ControlError as error:
            self.reply({"error": error.message, **error.extra}, error.status)
            return
        self.reply(result)


class CredentialsHandler(ControlHandler):
    async def get(self) -> None:
        await self._run(self._get)

    async def _get(self) -> dict[str, Any]:
        base = f"{self.request.protocol}://{self.request.host}"
        return {**dataclasses.asdict(self.fake.credentials), "api_base": base}


class PeopleHandler(ControlHandler):
    """GET /_sandbox/people/<index> or /_sandbox/people?oa_openid=… (mp_openid, unionid)."""

    async def get(self, index: str | None = None) -> None:
        self._index = index
        await self._run(self._get)

    async def _get(self) -> dict[str, Any]:
        if self._index:
            return person_json(self.find_person({"index": int(self._index)}))
        spec = {k: v[0].decode("utf-8") for k, v in self.request.query_arguments.items() if v}
        return person_json(self.find_person(spec))


class LoginCodeHandler(ControlHandler):
    """POST {who} -> {"code"}: a wx.login code for that person (single use, 5 minutes)."""

    async def post(self) -> None:
        await self._run(self._post)

    async def _post(self) -> dict[str, Any]:
        person = self.find_person(self.body_json())
        return {"code": self.fake.issue_login_code(person), "mp_openid": person.mp_openid}


class FollowHandler(ControlHandler):
    """POST {who, scene?, qr_scene?, qr_scene_str?, notify?} to /follow or /unfollow.

    With a webhook configured, `notify` (default true) also POSTs the subscribe/unsubscribe
    event, as WeChat does when a user follows; a QR scene makes it a qrscene_ subscribe.
    """

    def initialize(self, runtime: SandboxRuntime, follow: bool = True) -> None:
        super().initialize(runtime)
        self.following = follow

    async def post(self) -> None:
        await self._run(self._post)

    async def _post(self) -> dict[str, Any]:
        spec = self.body_json()
        person = self.find_person(spec)
        fake = self.fake
        was_following = person.follows
        qr = spec.get("qr_scene_str") or (str(spec["qr_scene"]) if spec.get("qr_scene") else None)
        if self.following:
            scene = spec.get("scene") or ("ADD_SCENE_QR_CODE" if qr else "ADD_SCENE_SEARCH")
            fake.follow(
                person,
                scene=str(scene),
                qr_scene=int(spec.get("qr_scene") or 0),
                qr_scene_str=str(spec.get("qr_scene_str") or ""),
            )
        else:
            fake.unfollow(person)
        delivery: Delivery | None = None
        sender = self.runtime.sender()
        if sender is not None and spec.get("notify", True) and was_following != person.follows:
            if self.following:
                delivery = await sender.subscribe(person.oa_openid, qr)
            else:
                delivery = await sender.unsubscribe(person.oa_openid)
        return {"person": person_json(person), "webhook": delivery_json(delivery)}


class EventHandler(ControlHandler):
    """POST {who, event: subscribe|unsubscribe|SCAN|text|TEMPLATESENDJOBFINISH, scene?,
    content?, msg_id?, msgid?, status?} -> the webhook's answer. Fires the event only; it does
    not change follow state (use /follow for that).

    text: `msg_id` is the MsgId (drawn if absent; "last" reuses the previous text message's,
    a collision across users: https://github.com/binarywang/WxJava/issues/333).
    TEMPLATESENDJOBFINISH: `msgid` is required, an integer (0 is a reported case) or null for
    a report without MsgID; `status` defaults to "success".
    """

    async def post(self) -> None:
        await self._run(self._post)

    async def _post(self) -> dict[str, Any]:
        spec = self.body_json()
        person = self.find_person(spec)
        sender = self.runtime.sender()
        if sender is None:
            raise _ControlError(400, "no webhook configured (POST /_sandbox/webhook first)")
        event = spec.get("event")
        scene = spec.get("scene")
        openid = person.oa_openid
        if event == "subscribe":
            delivery = await sender.subscribe(openid, str(scene) if scene is not None else None)
        elif event == "unsubscribe":
            delivery = await sender.unsubscribe(openid)
        elif event == "SCAN":
            delivery = await sender.scan(openid, str(scene or "0"))
        elif event == "text":
            content = str(spec.get("content", ""))
            self.fake.kefu.open(openid, "message")
            delivery = await sender.text(openid, content, _text_msg_id(spec, sender))
        elif event == "TEMPLATESENDJOBFINISH":
            if "msgid" not in spec:
                raise _ControlError(400, "TEMPLATESENDJOBFINISH needs msgid (an integer or null)")
            msgid = spec["msgid"]
            if msgid is not None and (isinstance(msgid, bool) or not isinstance(msgid, int)):
                raise _ControlError(400, "msgid must be an integer or null")
            status = spec.get("status", "success")
            delivery = await sender.template_finished(openid, msgid, str(status))
        else:
            raise _ControlError(
                400, "event must be subscribe, unsubscribe, SCAN, text or TEMPLATESENDJOBFINISH"
            )
        return {"webhook": delivery_json(delivery)}


def _text_msg_id(spec: dict[str, Any], sender: WebhookSender) -> int | None:
    msg_id = spec.get("msg_id")
    if msg_id == "last":
        if sender.last_msg_id is None:
            raise _ControlError(400, "no text message was sent yet")
        return sender.last_msg_id
    if msg_id is not None and (isinstance(msg_id, bool) or not isinstance(msg_id, int)):
        raise _ControlError(400, 'msg_id must be an integer or "last"')
    return msg_id


class ScanHandler(ControlHandler):
    """POST {who, ticket, duplicates?} -> {"event", "scene", "person", "webhook", "repeats"}."""

    async def post(self) -> None:
        await self._run(self._post)

    async def _post(self) -> dict[str, Any]:
        spec = self.body_json()
        person = self.find_person(spec)
        ticket = spec.get("ticket")
        duplicates = spec.get("duplicates", 0)
        if not isinstance(ticket, str):
            raise _ControlError(400, "ticket must be a string")
        if isinstance(duplicates, bool) or not isinstance(duplicates, int) or not 0 <= duplicates <= 3:
            raise _ControlError(400, "duplicates must be an integer 0..3")
        result = self.fake.scan(person, ticket)
        if result is None:
            raise _ControlError(404, "no QR code has this ticket")
        delivery: Delivery | None = None
        repeats: list[dict[str, Any] | None] = []
        sender = self.runtime.sender()
        if sender is not None and result.event is not None:
            openid = person.oa_openid
            if result.event == "subscribe":
                fields = sender.subscribe_fields(openid, result.scene, result.ticket)
            else:
                fields = sender.scan_fields(openid, result.scene or "", result.ticket)
            request = sender.build(fields)
            delivery = await sender.send(request)
            for _ in range(duplicates):
                repeats.append(delivery_json(await sender.send(request)))
        return {"event": result.event, "scene": result.scene, "person": person_json(person),
                "webhook": delivery_json(delivery), "repeats": repeats}


class QrCodesHandler(ControlHandler):
    """GET -> {"qrcodes": [{ticket, action, scene, created_at, expires_at, url}, ...]}."""

    async def get(self) -> None:
        await self._run(self._get)

    async def _get(self) -> dict[str, Any]:
        return {"qrcodes": [dataclasses.asdict(code) for code in self.fake.qrcodes.codes()]}


class AuthorizeHandler(ControlHandler):
    """POST {who, url, snapshot?, decline?} -> {"location"}, or 400 {"error", "errcode"}."""

    async def post(self) -> None:
        await self._run(self._post)

    async def _post(self) -> dict[str, Any]:
        spec = self.body_json()
        person = self.find_person(spec)
        url = spec.get("url")
        if not isinstance(url, str):
            raise _ControlError(400, "url must be a string")
        result = self.fake.webauth.authorize(person, url, snapshot=bool(spec.get("snapshot")),
                                             decline=bool(spec.get("decline")))
        if isinstance(result, Refused):
            raise _ControlError(400, result.message, errcode=result.errcode)
        return {"location": result}


class OAuthDomainHandler(ControlHandler):
    """POST {"domain": "h5.example.com" | null}: the OA's web-authorization domain."""

    async def post(self) -> None:
        await self._run(self._post)

    async def _post(self) -> dict[str, Any]:
        domain = self.body_json().get("domain")
        if domain is not None and not isinstance(domain, str):
            raise _ControlError(400, "domain must be a string or null")
        self.fake.webauth.oauth_domain = domain
        return {"domain": domain}


class KefuHandler(ControlHandler):
    """GET /_sandbox/kefu/<oa_openid> -> the customer-service messages that person received."""

    async def get(self, openid: str) -> None:
        self._openid = openid
        await self._run(self._get)

    async def _get(self) -> dict[str, Any]:
        return {"messages": self.fake.kefu.messages(self._openid)}


class FaultsHandler(ControlHandler):
    """POST adds a fault rule, GET lists the live ones, DELETE clears (see the module docstring)."""

    async def get(self) -> None:
        await self._run(self._get)

    async def post(self) -> None:
        await self._run(self._post)

    async def delete(self) -> None:
        await self._run(self._delete)

    async def _get(self) -> dict[str, Any]:
        return {"faults": [rule.as_json() for rule in self.fake.faults.live()]}

    async def _post(self) -> dict[str, Any]:
        spec = self.body_json()
        path, kind = spec.get("path"), spec.get("kind")
        if not isinstance(path, str) or not isinstance(kind, str):
            raise _ControlError(400, "need path (str) and kind (str)")
        unknown = set(spec) - _FAULT_FIELDS
        if unknown:
            raise _ControlError(400, f"unknown fields: {', '.join(sorted(unknown))}")
        until = spec.get("until")
        if until == "beijing_midnight":
            until = self.fake.next_beijing_midnight()
        try:
            rule = self.fake.script_fault(
                path,
                kind,
                spec["times"] if "times" in spec else ...,
                seconds=_number_or_none(spec, "seconds"),
                until=_number_or_none({"until": until}, "until"),
                app=_str_or_none(spec, "app"),
                openids=_strings(spec, "openids", "openid"),
                next_openid=_str_or_none(spec, "next_openid"),
                ips=_strings(spec, "ips", "ip") or (),
                errmsg=_str_or_none(spec, "errmsg"),
                allow=spec.get("allow", 0),
                per=spec.get("per"),
                per_openid=bool(spec.get("per_openid", False)),
            )
        except ValueError as error:
            raise _ControlError(400, str(error)) from None
        return rule.as_json()

    async def _delete(self) -> dict[str, Any]:
        path = self.get_query_argument("path", None)
        rule_id = self.get_query_argument("id", None)
        if rule_id is not None and not rule_id.isdigit():
            raise _ControlError(400, "id must be an integer")
        cleared = self.fake.clear_faults(path, int(rule_id) if rule_id is not None else None)
        return {"cleared": cleared}


_FAULT_FIELDS = frozenset({
    "path", "kind", "times", "seconds", "until", "app", "openids", "openid", "next_openid",
    "ips", "ip", "errmsg", "allow", "per", "per_openid",
})


def _number_or_none(spec: dict[str, Any], key: str) -> float | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _ControlError(400, f"{key} must be a number")
    return float(value)


def _str_or_none(spec: dict[str, Any], key: str) -> str | None:
    value = spec.get(key)
    if value is not None and not isinstance(value, str):
        raise _ControlError(400, f"{key} must be a string")
    return value


def _strings(spec: dict[str, Any], many: str, one: str) -> list[str] | None:
    """The list under `many`, or the single string under `one`, or None."""
    if many in spec:
        values = spec[many]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise _ControlError(400, f"{many} must be a list of strings")
        return values
    value = _str_or_none(spec, one)
    return [value] if value is not None else None


class CallsHandler(ControlHandler):
    """GET /_sandbox/calls?path=…&limit=… -> the newest calls (all when no limit)."""

    async def get(self) -> None:
        await self._run(self._get)

    async def _get(self) -> dict[str, Any]:
        path = self.get_query_argument("path", None)
        limit = int(self.get_query_argument("limit", "0") or 0)
        calls = [c for c in self.fake.calls if path is None or c.path == path]
        if limit > 0:
            calls = calls[-limit:]
        return {"count": len(calls), "calls": [call_json(c) for c in calls]}


class InboxHandler(ControlHandler):
    """GET /_sandbox/inbox/<oa_openid> -> the template messages that person received."""

    async def get(self, openid: str) -> None:
        self._openid = openid
        await self._run(self._get)

    async def _get(self) -> dict[str, Any]:
        return {"messages": self.fake.inbox(self._openid)}


class WebhookHandler(ControlHandler):
    """POST {url|null, mode?, report_delay_s?, report_status?, retries?}: configure_webhook."""

    async def post(self) -> None:
        await self._run(self._post)

    async def _post(self) -> dict[str, Any]:
        spec = self.body_json()
        url = spec.get("url")
        if url is not None and not isinstance(url, str):
            raise _ControlError(400, "url must be a string or null")
        try:
            self.fake.configure_webhook(
                url,
                mode=str(spec.get("mode", "plain")),
                report_delay_s=float(spec.get("report_delay_s", 0.0)),
                report_status=str(spec.get("report_status", "success")),
                retries=bool(spec.get("retries", False)),
            )
        except ValueError as error:
            raise _ControlError(400, str(error)) from None
        return {"url": url}


class StatsHandler(ControlHandler):
    async def get(self) -> None:
        await self._run(self._get)

    async def _get(self) -> dict[str, Any]:
        fake = self.fake
        return {
            "people": len(fake.people),
            "followers": len(fake.follower_openids),
            "calls": len(fake.calls),
            "token_fetches_today": {
                app: fake.tokens.classic_fetches_today(app) for app in ("oa", "mp")
            },
        }


def control_routes(runtime: SandboxRuntime) -> list[tuple[str, type[ControlHandler], dict[str, Any]]]:
    """The /_sandbox/ route table, each handler given `runtime`."""
    kw: dict[str, Any] = {"runtime": runtime}
    return [
        (r"/_sandbox/credentials", CredentialsHandler, kw),
        (r"/_sandbox/people/([0-9]+)", PeopleHandler, kw),
        (r"/_sandbox/people", PeopleHandler, kw),
        (r"/_sandbox/login_code", LoginCodeHandler, kw),
        (r"/_sandbox/follow", FollowHandler, {**kw, "follow": True}),
        (r"/_sandbox/unfollow", FollowHandler, {**kw, "follow": False}),
        (r"/_sandbox/events", EventHandler, kw),
        (r"/_sandbox/faults", FaultsHandler, kw),
        (r"/_sandbox/calls", CallsHandler, kw),
        (r"/_sandbox/inbox/(.+)", InboxHandler, kw),
        (r"/_sandbox/webhook", WebhookHandler, kw),
        (r"/_sandbox/scan", ScanHandler, kw),
        (r"/_sandbox/qrcodes", QrCodesHandler, kw),
        (r"/_sandbox/oauth/authorize", AuthorizeHandler, kw),
        (r"/_sandbox/oauth/domain", OAuthDomainHandler, kw),
        (r"/_sandbox/kefu/(.+)", KefuHandler, kw),
        (r"/_sandbox/stats", StatsHandler, kw),
    ]
