"""WeChat XML <-> typed Message dataclasses, and rendering of passive replies / WeChat-shaped XML.

Pure and synchronous: stdlib, wxd.errors and xmltodict only; never tornado/aiosqlite.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from xml.parsers import expat

import xmltodict

from wxd.errors import MessageError

MAX_XML_BYTES: int = 64 * 1024
_MAX_DEPTH = 16
_JSON_VERSION = 1

# Wrappers whose <List> children are documented. A single item arrives as one <List>, several as
# repeated <List>; both are normalised to a JSON array.
# https://developers.weixin.qq.com/doc/offiaccount/Subscription_Messages/api.html
_LIST_WRAPPERS = frozenset({"SubscribeMsgPopupEvent", "SubscribeMsgChangeEvent", "SubscribeMsgSentEvent"})
_CDATA_RE = re.compile(rb"<!\[CDATA\[.*?\]\]>", re.DOTALL)
_DECL_RE = re.compile(rb"<!(doctype|entity)", re.IGNORECASE)
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
# Characters XML 1.0 cannot carry, even inside CDATA.
_XML_INVALID_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_DIGITS_RE = re.compile(r"[0-9]{1,20}")


class _Forbidden(Exception):
    """Raised from inside expat callbacks to abort parsing."""


def _forbid(*_args: object) -> None:
    raise _Forbidden


class _StrictExpat:
    """An expat stand-in for xmltodict: parsers refuse DOCTYPEs and processing instructions.

    The byte scan in parse_xml is the first line; this is the authoritative one, because it
    sees exactly what the parser sees.
    """

    ExpatError = expat.ExpatError

    @staticmethod
    def ParserCreate(  # mirrors the expat API that xmltodict calls
        encoding: str | None = None, namespace_separator: str | None = None
    ) -> Any:
        parser = expat.ParserCreate(encoding, namespace_separator)
        parser.StartDoctypeDeclHandler = _forbid
        parser.ProcessingInstructionHandler = _forbid
        parser.EntityDeclHandler = _forbid
        return parser


# Fast path for the flat documents WeChat sends: <xml>, then children that are each
# <Name><![CDATA[text]]></Name> or <Name>plain-token</Name>, separated by spaces/tabs/newlines,
# no attributes, no repeats, no declarations. For such input it returns exactly what
# messages.parse_xml returns (tests/test_webhook.py checks this on generated documents); for
# anything else it returns None and parse_xml decides (and refuses what must be refused).
# Skipping xmltodict for the envelope and the inner message is most of the webhook's CPU;
# parse_xml tries it first.
_CDATA_CHAR = "[^\\]\x00-\x08\x0b-\x1f]"  # no "]", no CR, no C0 controls but TAB/LF
_CDATA_TEXT = _CDATA_CHAR + "*(?:\\](?!\\]>)" + _CDATA_CHAR + "*)*"  # never contains "]]>"
_FLAT_CHILD_RE = re.compile(
    rf"([ \t\n]*<([A-Za-z_][A-Za-z0-9_.-]{{0,63}})>"
    rf"(?:<!\[CDATA\[({_CDATA_TEXT})\]\]>|([A-Za-z0-9_.:@+/=-]*))</\2>)"
)


def flat_fields(data: bytes, max_bytes: int) -> dict[str, str] | None:
    """messages.parse_xml(data) for a flat WeChat document, or None to fall back to it."""
    if len(data) > max_bytes or not data.startswith(b"<xml>"):
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\ufffe" in text or "\uffff" in text:  # not XML characters
        return None
    body = text.rstrip(" \t\n")
    if not body.endswith("</xml>"):
        return None
    end = len(body[:-6].rstrip(" \t\n"))
    children = _FLAT_CHILD_RE.findall(text, 5, end)
    # findall skips what does not match: the children must tile <xml>...</xml> exactly.
    if sum(len(child[0]) for child in children) != end - 5:
        return None
    fields = {name: cdata or plain for _, name, cdata, plain in children}
    if len(fields) != len(children):
        return None  # a repeated child becomes JSON text in parse_xml
    return fields


def parse_xml(body: bytes | str, max_bytes: int = MAX_XML_BYTES, *,
              fast: bool = True) -> dict[str, str]:
    """Parse a WeChat <xml> document into a flat dict of its direct children.

    Values are the element text ("" for an empty element; CDATA and whitespace kept verbatim).
    A child that has children of its own, or a repeated child, becomes compact JSON text; the
    documented SubscribeMsg*Event wrappers become a JSON array of their <List> items.
    Attributes are ignored. Raises MessageError for input over `max_bytes`, non-UTF-8,
    DOCTYPE/ENTITY declarations (even when they would be harmless), processing instructions,
    malformed XML, nesting deeper than 16, or a root other than <xml>. The message never
    contains the body. `fast=False` skips the flat-document fast path (tests compare the two).
    """
    if isinstance(body, str):
        try:
            data = body.encode("utf-8")
        except UnicodeEncodeError:
            raise MessageError("body is not valid UTF-8") from None
    else:
        data = bytes(body)
    if len(data) > max_bytes:
        raise MessageError(f"body too large ({len(data)} > {max_bytes} bytes)")
    flat = flat_fields(data, max_bytes) if fast else None
    if flat is not None:
        return flat
    # Reject declarations before any parsing. CDATA contents are skipped so that a user's text
    # message containing "<!DOCTYPE" is still accepted; the parser hook re-checks anyway.
    if _DECL_RE.search(_CDATA_RE.sub(b"", data)):
        raise MessageError("DOCTYPE/ENTITY declarations are not allowed")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError("body is not valid UTF-8") from None
    try:
        # A str input makes xmltodict pass encoding="utf-8" to expat, which overrides any
        # encoding="..." in the XML declaration.
        doc = xmltodict.parse(
            text,
            expat=_StrictExpat,
            disable_entities=True,
            xml_attribs=False,
            strip_whitespace=False,
        )
    except _Forbidden:
        raise MessageError("DOCTYPE, entities and processing instructions are not allowed") from None
    except (expat.ExpatError, ValueError) as exc:
        raise MessageError(f"malformed XML: {type(exc).__name__}") from None
    if not isinstance(doc, dict) or list(doc) != ["xml"]:
        raise MessageError("root element is not <xml>")
    root = doc["xml"]
    if root is None or isinstance(root, str):
        return {}  # <xml/> or text only: no fields; parse_message reports what is missing
    if not isinstance(root, dict) or not _depth_within(root, _MAX_DEPTH):
        raise MessageError("XML nested too deeply")
    return {key: _field_text(key, value) for key, value in root.items() if key != "#text"}


def _depth_within(value: object, limit: int) -> bool:
    """Iterative depth check, so that later recursion (and json.dumps) cannot overflow."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return True


def _clean(value: object) -> object:
    """None -> "", and drop whitespace-only text that only separates child elements."""
    if value is None:
        return ""
    if isinstance(value, list):
        return [_clean(item) for item in value]
    if isinstance(value, dict):
        return {
            key: _clean(item)
            for key, item in value.items()
            if not (key == "#text" and isinstance(item, str) and not item.strip())
        }
    return value


def _field_text(key: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    cleaned = _clean(value)
    if key in _LIST_WRAPPERS and isinstance(cleaned, dict) and set(cleaned) <= {"List"}:
        items = cleaned.get("List", [])
        cleaned = items if isinstance(items, list) else [items]
    return json.dumps(cleaned, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _text(value: object) -> str | None:
    """A field value as text: str as is, int (not bool) in decimal, anything else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


@dataclass(frozen=True)
class Message:
    """A delivered message or event. `raw` holds every field as received (read-only)."""

    to_user: str
    from_user: str
    create_time: int
    msg_type: str
    raw: Mapping[str, Any] = field(repr=False, hash=False)

    @property
    def event(self) -> str | None:
        """The Event field (case-sensitive, as delivered), None for non-events."""
        return _text(self.raw.get("Event"))

    @property
    def dedupe_key(self) -> str:
        """Idempotency key for WeChat's retries.

        "msg:<FromUserName>:<MsgId>" when MsgId is present, else
        "evt:<FromUserName>:<CreateTime>:<Event or MsgType>[:<EventKey>]". WeChat's guide says
        to dedupe messages on MsgId, but MsgId collisions across users have been reported, so
        the sender is part of the key.
        https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Receiving_standard_messages.html
        https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Receiving_event_pushes.html

        Rows stored before the sender was added keep their "msg:<MsgId>" key: a WeChat retry
        of such a message arriving after the upgrade (retries last about 15 s) is stored a
        second time. Accepted: messages with a MsgId have no event job, so the only effect is
        a second inbox row, and rewriting every stored key at start would be a long write.
        """
        msg_id = _text(self.raw.get("MsgId"))
        if msg_id:
            return f"msg:{self.from_user}:{msg_id}"
        key = f"evt:{self.from_user}:{self.create_time}:{self.event or self.msg_type}"
        event_key = _text(self.raw.get("EventKey"))
        return f"{key}:{event_key}" if event_key else key


@dataclass(frozen=True)
class TextMessage(Message):
    """MsgType text."""

    content: str
    msg_id: str


@dataclass(frozen=True)
class SubscribeEvent(Message):
    """Event subscribe. `scene` is EventKey without "qrscene_", None for a non-QR follow."""

    event_key: str
    ticket: str
    scene: str | None


@dataclass(frozen=True)
class UnsubscribeEvent(Message):
    """Event unsubscribe."""


@dataclass(frozen=True)
class ScanEvent(Message):
    """Event SCAN: an existing follower scanned a parametric QR; EventKey has no prefix."""

    event_key: str
    ticket: str


@dataclass(frozen=True)
class TemplateSendJobFinish(Message):
    """Event TEMPLATESENDJOBFINISH. `msgid` comes from MsgID (capital D); None when MsgID is 0
    or missing (reported when client_msg_id was set), and then only the sender and CreateTime
    identify the report. `status` is verbatim, e.g. "success", "failed:user block",
    "failed: system failed"."""

    msgid: str | None
    status: str

    @property
    def dedupe_key(self) -> str:
        """ "tsjf:<MsgID>": one report per template message; without a MsgID
        "tsjf:<FromUserName>:<CreateTime>"."""
        if self.msgid is None:
            return f"tsjf:{self.from_user}:{self.create_time}"
        return f"tsjf:{self.msgid}"


@dataclass(frozen=True)
class OtherMessage(Message):
    """Any other MsgType or Event, or a known one lacking its specific fields."""


def parse_message(fields: Mapping[str, Any]) -> Message:
    """Build the typed Message for parsed fields (from parse_xml or message_from_json).

    MessageError when ToUserName, FromUserName or MsgType is missing or not a non-empty string,
    or CreateTime is not a non-negative integer (int or decimal string). Anything else never
    raises: unknown types and events, and known ones missing their own fields (e.g. a
    TEMPLATESENDJOBFINISH without Status), become OtherMessage.
    """
    header: dict[str, str] = {}
    for name in ("ToUserName", "FromUserName", "MsgType"):
        value = fields.get(name)
        if not isinstance(value, str) or not value:
            raise MessageError(f"missing or invalid {name}")
        header[name] = value
    raw_time = fields.get("CreateTime")
    if isinstance(raw_time, str) and _DIGITS_RE.fullmatch(raw_time.strip()):
        create_time = int(raw_time.strip())
    elif isinstance(raw_time, int) and not isinstance(raw_time, bool) and raw_time >= 0:
        create_time = raw_time
    else:
        raise MessageError("missing or invalid CreateTime")
    base: dict[str, Any] = {
        "to_user": header["ToUserName"],
        "from_user": header["FromUserName"],
        "create_time": create_time,
        "msg_type": header["MsgType"],
        "raw": MappingProxyType(dict(fields)),
    }
    msg_type = header["MsgType"]
    if msg_type == "text":
        content, msg_id = _text(fields.get("Content")), _text(fields.get("MsgId"))
        if content is not None and msg_id:
            return TextMessage(**base, content=content, msg_id=msg_id)
        return OtherMessage(**base)
    if msg_type != "event":
        return OtherMessage(**base)
    event = _text(fields.get("Event"))
    event_key = _text(fields.get("EventKey")) or ""
    ticket = _text(fields.get("Ticket")) or ""
    if event == "subscribe":
        scene = event_key[len("qrscene_") :] if event_key.startswith("qrscene_") else None
        return SubscribeEvent(**base, event_key=event_key, ticket=ticket, scene=scene)
    if event == "unsubscribe":
        return UnsubscribeEvent(**base)
    if event == "SCAN":
        return ScanEvent(**base, event_key=event_key, ticket=ticket)
    if event == "TEMPLATESENDJOBFINISH":
        msgid, status = _text(fields.get("MsgID")), _text(fields.get("Status"))
        if status is not None:
            if msgid is not None and not msgid.strip().lstrip("0"):
                msgid = None  # "0" (or "") identifies no message
            return TemplateSendJobFinish(**base, msgid=msgid, status=status)
    return OtherMessage(**base)


def message_to_json(msg: Message) -> str:
    """Serialise for the inbox: only the raw fields are stored (they must be JSON-serialisable,
    as parse_xml output always is); message_from_json re-derives the type."""
    return json.dumps(
        {"v": _JSON_VERSION, "raw": dict(msg.raw)},
        ensure_ascii=False,
        separators=(",", ":"),
        sort_keys=True,
    )


def message_from_json(text: str) -> Message:
    """Inverse of message_to_json; MessageError for anything it did not produce."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise MessageError("stored message is not JSON") from None
    if not isinstance(doc, dict) or doc.get("v") != _JSON_VERSION:
        raise MessageError("stored message has an unknown format")
    raw = doc.get("raw")
    if not isinstance(raw, dict):
        raise MessageError("stored message has no raw fields")
    return parse_message(raw)


def _cdata(text: str) -> str:
    # "]]>" cannot appear inside CDATA: end the section after "]]" and start a new one for ">".
    return "<![CDATA[" + text.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def render_event_xml(fields: Mapping[str, str | int]) -> str:
    """Render a WeChat-shaped <xml> document: str values in CDATA, int values bare, in order.

    ValueError for an invalid element name or a character XML 1.0 cannot carry; TypeError for
    a value that is neither str nor int (bool included).
    """
    parts = ["<xml>"]
    for name, value in fields.items():
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"invalid element name {name!r}")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TypeError(f"element {name} must be str or int, not {type(value).__name__}")
        if isinstance(value, int):
            parts.append(f"<{name}>{value}</{name}>")
        else:
            if _XML_INVALID_RE.search(value):
                raise ValueError(f"element {name} contains characters XML cannot carry")
            parts.append(f"<{name}>{_cdata(value)}</{name}>")
    parts.append("</xml>")
    return "".join(parts)


def render_text_reply(to_user: str, from_user: str, content: str, create_time: int) -> str:
    """Render a passive text reply. `to_user` is the user's openid, `from_user` the OA's gh_ id
    (the request's FromUserName/ToUserName swapped); create_time is unix seconds."""
    return render_event_xml(
        {
            "ToUserName": to_user,
            "FromUserName": from_user,
            "CreateTime": create_time,
            "MsgType": "text",
            "Content": content,
        }
    )
