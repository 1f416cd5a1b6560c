"""Read the INI configuration into frozen section dataclasses, validated once; no secret in reprs.

Each key is declared once, as a `key(...)` field of its section's dataclass; the loader, the
WXD_<SECTION>_<KEY> overrides and the documentation test all walk those fields. Base: imports the
standard library, wxd.errors and wxd.aeskey only. Only cli.py reads files and the environment.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import math
import re
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from wxd.aeskey import check_aes_key
from wxd.errors import ConfigError

APPID_RE = re.compile(r"^wx[0-9a-fA-F]{16}$")
# Every callback type ([callbacks] events; store/callbacks.py writes them). Those in
# CALLBACK_TYPES_NOT_YET belong to features this wxd does not have yet: accepted, never written.
CALLBACK_TYPES: tuple[str, ...] = (
    "follower.subscribed", "follower.unsubscribed", "user.linked", "user.unlinked",
    "push.sent", "push.delivered", "push.failed", "subscription.changed", "campaign.finished",
    "message.received",
)
CALLBACK_TYPES_NOT_YET: frozenset[str] = frozenset({"subscription.changed", "campaign.finished"})
LOG_LEVELS = ("debug", "info", "warning", "error")
ENV_PREFIX = "WXD_"

Cast = Callable[[str], Any]
"""Turns a key's stripped text into its value; ValueError("must ...") never quoting the text."""


@dataclass(frozen=True)
class KeySpec:
    """How one key is read: its default text (None = required), its cast, whether it is secret.

    A secret is left out of reprs, and a required secret that is empty counts as missing.
    """

    default: str | None
    cast: Cast
    secret: bool = False


_SPEC = "wxd.config"  # the dataclasses.field metadata entry holding a KeySpec


def key(default: str | None, cast: Cast, *, secret: bool = False) -> Any:
    """Declare a section field as a configuration key (its one declaration).

    `default` is the text an absent key takes, exactly as wxd.conf.example spells it.
    """
    return dataclasses.field(repr=not secret, metadata={_SPEC: KeySpec(default, cast, secret)})


# Values ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listen:
    """A host:port pair. Port 0 asks the OS for a free port (tests)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class TimeOfDay:
    """A wall-clock time of day (HH:MM); the key that holds it says which time zone."""

    hour: int
    minute: int

    def __str__(self) -> str:
        return f"{self.hour:02d}:{self.minute:02d}"

    @property
    def seconds(self) -> float:
        """Seconds after midnight."""
        return self.hour * 3600.0 + self.minute * 60.0


# Casts ---------------------------------------------------------------------------------------------


def string(value: str) -> str:
    return value


def boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("must be true or false")


def choice(*options: str) -> Cast:
    """One of `options`, case-insensitive; the value is lower-cased."""
    def cast(value: str) -> str:
        if value.lower() not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value.lower()
    return cast


def _at_least(parse: Callable[[str], float], what: str, minimum: float) -> Cast:
    def cast(value: str) -> float:
        try:
            parsed = parse(value)
        except ValueError:
            raise ValueError(f"must be {what}") from None
        if not math.isfinite(parsed):
            raise ValueError(f"must be {what}")
        if parsed < minimum:
            raise ValueError(f"must be at least {minimum:g}")
        return parsed
    return cast


def integer(minimum: int) -> Cast:
    return _at_least(int, "an integer", minimum)


def number(minimum: float) -> Cast:
    """A finite float (nan and inf are refused: every number here is a duration or a rate)."""
    return _at_least(float, "a number", minimum)


def parse_listen(value: str) -> Listen:
    """Parse `host:port` or `[v6]:port`; ValueError with a short reason otherwise."""
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not host:
        raise ValueError("expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("host must be an IP address or localhost") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("port must be a number 0..65535")
    return Listen(host, int(port_text))


def wechat_appid(value: str) -> str:
    if not APPID_RE.match(value):
        raise ValueError("must be 'wx' followed by 16 hex characters")
    return value


def aes_key(value: str) -> str:
    """An EncodingAESKey, or empty for none."""
    if value:
        check_aes_key(value)
    return value


def url_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must start with /")
    return value


def http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value


def optional_url(value: str) -> str:
    """Empty (unset), or an https URL with a host (http too, for local development)."""
    if not value:
        return value
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("https", "http") or not rest.split("/", 1)[0]:
        raise ValueError("must be empty or an https:// URL (http:// for local development)")
    return value


_HOST_RE = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                      r"(?::[0-9]{1,5})?")


def host_list(value: str) -> tuple[str, ...]:
    """Host names (host or host:port, lower-cased), separated by commas or spaces; may be empty."""
    hosts = tuple(part.lower() for part in re.split(r"[,\s]+", value) if part)
    for host in hosts:
        if not _HOST_RE.fullmatch(host):
            raise ValueError("must be host names (host or host:port) separated by commas")
    return hosts


def callback_url(value: str) -> str:
    """The backend's callback URL, or empty for none (callbacks off)."""
    if not value:
        return value
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host, or empty")
    try:
        _ = parts.port  # ValueError for a port that is not 0..65535
    except ValueError:
        raise ValueError("has an invalid port") from None
    return value


def callback_types(value: str) -> frozenset[str]:
    """`*` (every type) or a comma list of callback types."""
    if value == "*":
        return frozenset(CALLBACK_TYPES)
    names = {name.strip() for name in value.split(",") if name.strip()}
    if not names or not names <= set(CALLBACK_TYPES):
        raise ValueError(f"must be * or a comma list of: {', '.join(CALLBACK_TYPES)}")
    return frozenset(names)


def alnum_token(value: str) -> str:
    """The webhook Token: WeChat's console accepts letters and digits only."""
    if value and (not value.isascii() or not value.isalnum()):
        raise ValueError("must contain only letters and digits")
    return value


def long_token(value: str) -> str:
    if value and len(value) < 16:
        raise ValueError("must be at least 16 characters")
    return value


_HH_MM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


def beijing_time(value: str) -> TimeOfDay:
    """HH:MM (00:00..23:59), Beijing time."""
    match = _HH_MM.fullmatch(value)
    if match is None:
        raise ValueError("must be HH:MM (Beijing time)")
    return TimeOfDay(int(match[1]), int(match[2]))


# The table: one frozen dataclass per section, one field per key ------------------------------------


@dataclass(frozen=True)
class WxdConfig:
    database: str = key("/var/lib/wxd/wxd.db", string)
    shutdown_timeout_s: float = key("10", number(0.1))
    lease_s: float = key("120", number(5))
    log_level: str = key("info", choice(*LOG_LEVELS))
    log_format: str = key("text", choice("text", "json"))


@dataclass(frozen=True)
class WebhookConfig:
    listen: Listen = key("0.0.0.0:8080", parse_listen)
    path: str = key("/wechat", url_path)
    token: str = key(None, alnum_token, secret=True)
    encoding_aes_key: str = key("", aes_key, secret=True)
    previous_encoding_aes_key: str = key("", aes_key, secret=True)
    require_encryption: bool = key("false", boolean)
    replay_window_s: float = key("300", number(1))
    max_body_bytes: int = key("65536", integer(1024))
    public_url: str = key("", optional_url)


@dataclass(frozen=True)
class AdminConfig:
    listen: Listen = key("127.0.0.1:8081", parse_listen)
    token: str = key(None, long_token, secret=True)
    allow_remote: bool = key("false", boolean)
    max_body_bytes: int = key("8388608", integer(1024))


@dataclass(frozen=True)
class AppConfig:
    """Credentials of one WeChat app (the OA or the MP)."""

    appid: str = key(None, wechat_appid)
    secret: str = key(None, string, secret=True)


@dataclass(frozen=True)
class WeChatConfig:
    api_base: str = key("https://api.weixin.qq.com", http_url)
    token_mode: str = key("stable", choice("stable", "legacy"))
    connect_timeout_s: float = key("5", number(0.1))
    request_timeout_s: float = key("10", number(0.1))
    max_clients: int = key("64", integer(1))
    token_refresh_margin_s: float = key("900", number(60))
    token_check_interval_s: float = key("30", number(1))
    token_daily_budget: int = key("1500", integer(1))
    token_backoff_base_s: float = key("5", number(0.01))
    token_backoff_max_s: float = key("300", number(0.01))
    token_quota_pause_s: float = key("3600", number(1))
    unreachable_probe_s: float = key("60", number(1))


@dataclass(frozen=True)
class PushesConfig:
    workers: int = key("8", integer(1))
    rate_per_s: float = key("0", number(0))
    max_attempts: int = key("8", integer(1))
    backoff_base_s: float = key("2", number(0.01))
    backoff_max_s: float = key("600", number(0.01))
    quota_resume_time: TimeOfDay = key("00:05", beijing_time)
    frequency_backoff_base_s: float = key("60", number(0.01))
    frequency_backoff_max_s: float = key("14400", number(0.01))
    stale_sending: str = key("resend", choice("resend", "fail"))
    template_cache_s: float = key("3600", number(0))


@dataclass(frozen=True)
class EventsConfig:
    workers: int = key("16", integer(1))
    max_attempts: int = key("10", integer(1))
    backoff_base_s: float = key("2", number(0.01))
    backoff_max_s: float = key("600", number(0.01))
    quota_resume_time: TimeOfDay = key("00:05", beijing_time)
    frequency_backoff_base_s: float = key("60", number(0.01))
    frequency_backoff_max_s: float = key("14400", number(0.01))


@dataclass(frozen=True)
class BackfillConfig:
    concurrency: int = key("4", integer(1))
    rate_per_s: float = key("100", number(0))
    resync_interval_s: float = key("0", number(0))
    defer_unionid_index: bool = key("true", boolean)
    max_attempts: int = key("8", integer(1))
    backoff_base_s: float = key("0.5", number(0.01))
    backoff_max_s: float = key("30", number(0.01))
    quota_resume_time: TimeOfDay = key("00:01", beijing_time)


@dataclass(frozen=True)
class FollowersConfig:
    purge_on_unsubscribe: bool = key("false", boolean)


@dataclass(frozen=True)
class LinkingConfig:
    qrcode_reply: str = key("", string)
    qrcode_card_thumb_media_id: str = key("", string)
    qrcode_card_pagepath: str = key("", string)
    qrcode_card_title: str = key("绑定成功", string)
    oauth_return_hosts: tuple[str, ...] = key("", host_list)


@dataclass(frozen=True)
class CallbacksConfig:
    url: str = key("", callback_url)
    secret: str = key("", long_token, secret=True)
    events: frozenset[str] = key("*", callback_types)
    timeout_s: float = key("10", number(0.1))
    retry_base_s: float = key("5", number(0.01))
    retry_max_s: float = key("3600", number(0.01))
    max_age_s: float = key("86400", number(1))
    concurrency: int = key("8", integer(1))

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class Config:
    """One field per [section], in file order; a section typed `X | None` is optional (absent → None)."""

    wxd: WxdConfig
    webhook: WebhookConfig
    admin: AdminConfig
    official_account: AppConfig
    mini_program: AppConfig | None
    wechat: WeChatConfig
    pushes: PushesConfig
    events: EventsConfig
    backfill: BackfillConfig
    followers: FollowersConfig
    linking: LinkingConfig
    callbacks: CallbacksConfig


# The index the loader walks, derived from the table above -----------------------------------------


@dataclass(frozen=True)
class Section:
    """One [section]: its dataclass, whether it may be absent, and its keys in declaration order."""

    cls: type[Any]
    optional: bool
    keys: Mapping[str, KeySpec]

    @classmethod
    def of(cls, section: type[Any], optional: bool = False) -> Section:
        """Index a section dataclass; TypeError if one of its fields was not declared with key()."""
        keys: dict[str, KeySpec] = {}
        for spec_field in dataclasses.fields(section):
            spec = spec_field.metadata.get(_SPEC)
            if not isinstance(spec, KeySpec):
                raise TypeError(f"{section.__name__}.{spec_field.name} is not declared with key()")
            keys[spec_field.name] = spec
        return cls(section, optional, types.MappingProxyType(keys))


def _sections(root: type[Any]) -> dict[str, Section]:
    """Index `root`'s fields: each names a section; a field typed `X | None` is optional."""
    hints = typing.get_type_hints(root)
    found: dict[str, Section] = {}
    for section_field in dataclasses.fields(root):
        hint = hints[section_field.name]
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        optional = bool(members) and len(members) < len(typing.get_args(hint))
        found[section_field.name] = Section.of(members[0] if optional else hint, optional)
    return found


SECTIONS: Mapping[str, Section] = types.MappingProxyType(_sections(Config))
"""Every section wxd reads, by name. wxd.conf.example documents each key (a test checks)."""


# Loading -------------------------------------------------------------------------------------------


def _env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, str], str]:
    """Map WXD_<SECTION>_<KEY> variables onto known (section, key) pairs."""
    found: dict[tuple[str, str], str] = {}
    for section, spec in SECTIONS.items():
        for name in spec.keys:
            variable = f"{ENV_PREFIX}{section}_{name}".upper()
            if variable in environ:
                found[(section, name)] = environ[variable]
    return found


def load_text(text: str, environ: Mapping[str, str] | None = None, source: str = "<config>") -> Config:
    """Parse INI text (never executed) plus WXD_* overrides; raise ConfigError listing every problem."""
    parser = configparser.ConfigParser(interpolation=None, default_section="__defaults__")
    problems: list[str] = []
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        raise ConfigError([f"{source}: cannot parse: {exc.message.splitlines()[0]}"]) from None

    raw: dict[str, dict[str, str]] = {}
    for section in parser.sections():
        if section not in SECTIONS:
            problems.append(f"[{section}]: unknown section")
            continue
        raw[section] = {}
        for name, value in parser.items(section):
            if name not in SECTIONS[section].keys:
                problems.append(f"[{section}] {name}: unknown key")
                continue
            raw[section][name] = value
    for (section, name), value in _env_overrides(environ or {}).items():
        raw.setdefault(section, {})[name] = value

    values: dict[str, dict[str, Any]] = {}
    for section, spec in SECTIONS.items():
        if spec.optional and section not in raw:
            continue
        given = raw.get(section, {})
        values[section] = {}
        for name, key_spec in spec.keys.items():
            text_value = given.get(name, key_spec.default)
            if text_value is None or (key_spec.secret and key_spec.default is None
                                      and not text_value.strip()):
                problems.append(f"[{section}] {name}: required but missing")
                continue
            try:
                values[section][name] = key_spec.cast(text_value.strip())
            except ValueError as exc:
                problems.append(f"[{section}] {name}: {exc}")

    problems.extend(_cross_checks(values))
    if problems:
        raise ConfigError(problems)
    built: dict[str, Any] = {section: SECTIONS[section].cls(**values[section]) if section in values
                             else None for section in SECTIONS}
    return Config(**built)


def _cross_checks(values: dict[str, dict[str, Any]]) -> list[str]:
    """Rules that relate two keys (a rule about one key lives in its cast)."""
    problems: list[str] = []
    admin = values.get("admin", {})
    listen = admin.get("listen")
    if isinstance(listen, Listen) and not listen.loopback and not admin.get("allow_remote"):
        problems.append(
            "[admin] listen: not a loopback address; set [admin] allow_remote = true to expose "
            "the admin API beyond this host"
        )
    webhook = values.get("webhook", {})
    if webhook.get("require_encryption") and not webhook.get("encoding_aes_key"):
        problems.append("[webhook] require_encryption: needs encoding_aes_key")
    if webhook.get("previous_encoding_aes_key") and not webhook.get("encoding_aes_key"):
        problems.append("[webhook] previous_encoding_aes_key: set only with encoding_aes_key")
    public_url = webhook.get("public_url")
    if isinstance(public_url, str) and public_url and (
            any(c in public_url for c in "?#\\ \t") or "@" in public_url.split("/")[2]):
        problems.append("[webhook] public_url: must be a plain URL (no query, fragment, user "
                        "or spaces): wxd appends /oauth/... to it")
    linking = values.get("linking", {})
    card = [linking.get("qrcode_card_thumb_media_id"), linking.get("qrcode_card_pagepath")]
    if any(card) and not all(card):
        problems.append("[linking] qrcode_card_pagepath: set together with "
                        "qrcode_card_thumb_media_id (both or neither)")
    if all(card) and "mini_program" not in values:
        problems.append("[linking] qrcode_card_thumb_media_id: a Mini Program card needs the "
                        "[mini_program] section")
    callbacks = values.get("callbacks", {})
    url = callbacks.get("url")
    if url and not callbacks.get("secret"):
        problems.append("[callbacks] secret: required when url is set")
    if url and isinstance(listen, Listen) and targets_listener(url, listen):
        problems.append("[callbacks] url: points at wxd's own admin listener")
    return problems


_THIS_HOST = ("localhost", "0.0.0.0", "::")


def targets_listener(url: str, listen: Listen) -> bool:
    """True when `url` (http or https) would reach `listen` on this host: same port, and a
    loopback or unspecified address or the listener's own. Port 0 (chosen at bind) never
    matches here; the daemon checks again with the bound port."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    if listen.port == 0 or port != listen.port:
        return False
    if host in _THIS_HOST or host == listen.host.lower():
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the file at `path`; ConfigError if it cannot be read or is invalid."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return load_text(text, environ, source=path)
