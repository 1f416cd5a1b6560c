"""Read the INI configuration into frozen dataclasses, validate it once, keep secrets out of reprs.

Pure: imports only the standard library and wxd.errors. Only cli.py reads files and the
environment; it passes the text and `os.environ` in.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wxd.errors import ConfigError

APPID_RE = re.compile(r"^wx[0-9a-fA-F]{16}$")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Key:
    """One documented configuration key: its type, default (None = required) and constraints."""

    kind: str  # "str" | "int" | "float" | "bool" | "listen" | "choice" | "appid" | "aeskey"
    default: str | None
    secret: bool = False
    choices: tuple[str, ...] = ()
    minimum: float | None = None


# The single table of every key wxd reads. wxd.conf.example documents each one (a test checks).
SPEC: dict[str, dict[str, Key]] = {
    "wxd": {
        "database": Key("str", "/var/lib/wxd/wxd.db"),
        "shutdown_timeout_s": Key("float", "10", minimum=0.1),
        "log_level": Key("choice", "info", choices=LOG_LEVELS),
        "log_format": Key("choice", "text", choices=("text", "json")),
    },
    "webhook": {
        "listen": Key("listen", "0.0.0.0:8080"),
        "path": Key("str", "/wechat"),
        "token": Key("str", None, secret=True),
        "encoding_aes_key": Key("aeskey", "", secret=True),
        "previous_encoding_aes_key": Key("aeskey", "", secret=True),
        "require_encryption": Key("bool", "false"),
        "replay_window_s": Key("float", "300", minimum=1),
        "max_body_bytes": Key("int", "65536", minimum=1024),
    },
    "admin": {
        "listen": Key("listen", "127.0.0.1:8081"),
        "token": Key("str", None, secret=True),
        "allow_remote": Key("bool", "false"),
        "max_body_bytes": Key("int", "8388608", minimum=1024),
    },
    "official_account": {
        "appid": Key("appid", None),
        "secret": Key("str", None, secret=True),
    },
    "mini_program": {
        "appid": Key("appid", None),
        "secret": Key("str", None, secret=True),
    },
    "wechat": {
        "api_base": Key("str", "https://api.weixin.qq.com"),
        "token_mode": Key("choice", "stable", choices=("stable", "legacy")),
        "connect_timeout_s": Key("float", "5", minimum=0.1),
        "request_timeout_s": Key("float", "10", minimum=0.1),
        "max_clients": Key("int", "64", minimum=1),
        "token_refresh_margin_s": Key("float", "900", minimum=60),
        "token_check_interval_s": Key("float", "30", minimum=1),
        "token_daily_budget": Key("int", "1500", minimum=1),
    },
    "pushes": {
        "workers": Key("int", "8", minimum=1),
        "rate_per_s": Key("float", "0", minimum=0),
        "max_attempts": Key("int", "8", minimum=1),
        "backoff_base_s": Key("float", "2", minimum=0.01),
        "backoff_max_s": Key("float", "600", minimum=0.01),
        "quota_resume_time": Key("str", "00:05"),
        "stale_sending": Key("choice", "resend", choices=("resend", "fail")),
        "template_cache_s": Key("float", "3600", minimum=0),
    },
    "events": {
        "workers": Key("int", "2", minimum=1),
        "max_attempts": Key("int", "10", minimum=1),
    },
    "backfill": {
        "concurrency": Key("int", "4", minimum=1),
        "rate_per_s": Key("float", "100", minimum=0),
        "resync_interval_s": Key("float", "0", minimum=0),
        "defer_unionid_index": Key("bool", "true"),
    },
    "followers": {
        "purge_on_unsubscribe": Key("bool", "false"),
    },
}
OPTIONAL_SECTIONS = frozenset({"mini_program"})
ENV_PREFIX = "WXD_"


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
class WxdConfig:
    database: str
    shutdown_timeout_s: float
    log_level: str
    log_format: str


@dataclass(frozen=True)
class WebhookConfig:
    listen: Listen
    path: str
    token: str = field(repr=False)
    encoding_aes_key: str = field(repr=False)
    previous_encoding_aes_key: str = field(repr=False)
    require_encryption: bool
    replay_window_s: float
    max_body_bytes: int


@dataclass(frozen=True)
class AdminConfig:
    listen: Listen
    token: str = field(repr=False)
    allow_remote: bool
    max_body_bytes: int


@dataclass(frozen=True)
class AppConfig:
    """Credentials of one WeChat app (the OA or the MP)."""

    appid: str
    secret: str = field(repr=False)


@dataclass(frozen=True)
class WeChatConfig:
    api_base: str
    token_mode: str
    connect_timeout_s: float
    request_timeout_s: float
    max_clients: int
    token_refresh_margin_s: float
    token_check_interval_s: float
    token_daily_budget: int


@dataclass(frozen=True)
class PushesConfig:
    workers: int
    rate_per_s: float
    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float
    quota_resume_time: str
    stale_sending: str
    template_cache_s: float


@dataclass(frozen=True)
class EventsConfig:
    workers: int
    max_attempts: int


@dataclass(frozen=True)
class BackfillConfig:
    concurrency: int
    rate_per_s: float
    resync_interval_s: float
    defer_unionid_index: bool


@dataclass(frozen=True)
class FollowersConfig:
    purge_on_unsubscribe: bool


@dataclass(frozen=True)
class Config:
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


SECTION_TYPES: dict[str, type[Any]] = {
    "wxd": WxdConfig,
    "webhook": WebhookConfig,
    "admin": AdminConfig,
    "official_account": AppConfig,
    "mini_program": AppConfig,
    "wechat": WeChatConfig,
    "pushes": PushesConfig,
    "events": EventsConfig,
    "backfill": BackfillConfig,
    "followers": FollowersConfig,
}


def parse_listen(text: str) -> Listen:
    """Parse `host:port` or `[v6]:port`; ValueError with a short reason otherwise."""
    host, sep, port_text = text.strip().rpartition(":")
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


def check_aes_key(value: str) -> None:
    """EncodingAESKey: 43 characters of [A-Za-z0-9] decoding (with '=') to 32 bytes."""
    if len(value) != 43:
        raise ValueError(f"must be 43 characters, got {len(value)}")
    if not value.isascii() or not value.isalnum():
        raise ValueError("must contain only letters and digits")
    try:
        key = base64.b64decode(value + "=", validate=True)
    except binascii.Error:
        raise ValueError("is not valid base64") from None
    if len(key) != 32:
        raise ValueError("must decode to 32 bytes")


def _cast(name: str, spec: Key, raw: str) -> Any:
    value = raw.strip()
    if spec.kind in ("str", "aeskey"):
        if spec.kind == "aeskey" and value:
            check_aes_key(value)
        return value
    if spec.kind == "appid":
        if not APPID_RE.match(value):
            raise ValueError("must be 'wx' followed by 16 hex characters")
        return value
    if spec.kind == "choice":
        if value.lower() not in spec.choices:
            raise ValueError(f"must be one of {', '.join(spec.choices)}")
        return value.lower()
    if spec.kind == "bool":
        lowered = value.lower()
        if lowered in ("1", "yes", "true", "on"):
            return True
        if lowered in ("0", "no", "false", "off"):
            return False
        raise ValueError("must be true or false")
    if spec.kind == "listen":
        return parse_listen(value)
    number: float
    try:
        number = int(value) if spec.kind == "int" else float(value)
    except ValueError:
        raise ValueError(f"must be {'an integer' if spec.kind == 'int' else 'a number'}") from None
    if spec.minimum is not None and number < spec.minimum:
        raise ValueError(f"must be at least {spec.minimum:g}")
    return number


def _env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, str], str]:
    """Map WXD_<SECTION>_<KEY> variables onto known (section, key) pairs."""
    found: dict[tuple[str, str], str] = {}
    for section, keys in SPEC.items():
        for key in keys:
            name = f"{ENV_PREFIX}{section}_{key}".upper()
            if name in environ:
                found[(section, key)] = environ[name]
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
        if section not in SPEC:
            problems.append(f"[{section}]: unknown section")
            continue
        raw[section] = {}
        for key, value in parser.items(section):
            if key not in SPEC[section]:
                problems.append(f"[{section}] {key}: unknown key")
                continue
            raw[section][key] = value
    for (section, key), value in _env_overrides(environ or {}).items():
        raw.setdefault(section, {})[key] = value

    values: dict[str, dict[str, Any]] = {}
    for section, keys in SPEC.items():
        if section in OPTIONAL_SECTIONS and section not in raw:
            continue
        given = raw.get(section, {})
        values[section] = {}
        for key, spec in keys.items():
            text_value = given.get(key, spec.default)
            if text_value is None or (spec.secret and spec.default is None and not text_value.strip()):
                problems.append(f"[{section}] {key}: required but missing")
                continue
            try:
                values[section][key] = _cast(key, spec, text_value)
            except ValueError as exc:
                problems.append(f"[{section}] {key}: {exc}")

    problems.extend(_cross_checks(values))
    if problems:
        raise ConfigError(problems)
    built = {name: SECTION_TYPES[name](**fields) for name, fields in values.items()}
    built.setdefault("mini_program", None)
    return Config(**built)


def _cross_checks(values: dict[str, dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    admin = values.get("admin", {})
    listen = admin.get("listen")
    if isinstance(listen, Listen) and not listen.loopback and not admin.get("allow_remote"):
        problems.append(
            "[admin] listen: not a loopback address; set [admin] allow_remote = true to expose "
            "the admin API beyond this host"
        )
    token = admin.get("token")
    if isinstance(token, str) and token and len(token) < 16:
        problems.append("[admin] token: must be at least 16 characters")
    webhook = values.get("webhook", {})
    path = webhook.get("path")
    if isinstance(path, str) and not path.startswith("/"):
        problems.append("[webhook] path: must start with /")
    wtoken = webhook.get("token")
    if isinstance(wtoken, str) and wtoken and (not wtoken.isascii() or not wtoken.isalnum()):
        problems.append("[webhook] token: must contain only letters and digits")
    if webhook.get("require_encryption") and not webhook.get("encoding_aes_key"):
        problems.append("[webhook] require_encryption: needs encoding_aes_key")
    if webhook.get("previous_encoding_aes_key") and not webhook.get("encoding_aes_key"):
        problems.append("[webhook] previous_encoding_aes_key: set only with encoding_aes_key")
    base = values.get("wechat", {}).get("api_base")
    if isinstance(base, str) and not base.startswith(("http://", "https://")):
        problems.append("[wechat] api_base: must start with http:// or https://")
    resume = values.get("pushes", {}).get("quota_resume_time")
    if isinstance(resume, str) and not re.match(r"^([01]\d|2[0-3]):[0-5]\d$", resume):
        problems.append("[pushes] quota_resume_time: must be HH:MM (Beijing time)")
    return problems


def load(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the file at `path`; ConfigError if it cannot be read or is invalid."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return load_text(text, environ, source=path)
