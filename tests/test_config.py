"""Config parsing and validation: every bad value names its [section] key; env wins; no secrets."""

from __future__ import annotations

import configparser
import dataclasses
import pathlib

import pytest

from tests.helpers import ADMIN_TOKEN, AES_KEY, config_text
from wxd import config
from wxd.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load(sections: dict[str, dict[str, object]] | None = None, env: dict[str, str] | None = None,
         mini_program: bool = True) -> config.Config:
    return config.load_text(config_text("/tmp/x.db", sections, mini_program), env or {})


def problems(sections: dict[str, dict[str, object]], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(sections, env)
    return info.value.problems


def test_valid_config_loads_with_defaults() -> None:
    cfg = load()
    assert cfg.webhook.path == "/wechat"
    assert cfg.webhook.replay_window_s == 300
    assert cfg.wechat.token_mode == "stable"
    assert cfg.admin.listen.host == "127.0.0.1"
    assert cfg.mini_program is not None and cfg.mini_program.appid.startswith("wx")


def test_mini_program_section_is_optional() -> None:
    assert load(mini_program=False).mini_program is None


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"webhook": {"encoding_aes_key": AES_KEY[:-1]}}, "[webhook] encoding_aes_key"),
        ({"webhook": {"encoding_aes_key": AES_KEY + "A"}}, "[webhook] encoding_aes_key"),
        ({"webhook": {"encoding_aes_key": AES_KEY[:-1] + "!"}}, "[webhook] encoding_aes_key"),
        ({"webhook": {"listen": "0.0.0.0"}}, "[webhook] listen"),
        ({"webhook": {"listen": "example.com:80"}}, "[webhook] listen"),
        ({"webhook": {"listen": "127.0.0.1:99999"}}, "[webhook] listen"),
        ({"webhook": {"token": None}}, "[webhook] token: required"),
        ({"official_account": {"secret": None}}, "[official_account] secret: required"),
        ({"official_account": {"secret": ""}}, "[official_account] secret: required"),
        ({"official_account": {"appid": "wx123"}}, "[official_account] appid"),
        ({"mini_program": {"secret": None}}, "[mini_program] secret: required"),
        ({"admin": {"listen": "0.0.0.0:8081"}}, "[admin] listen: not a loopback"),
        ({"admin": {"token": "short"}}, "[admin] token"),
        ({"admin": {"colour": "blue"}}, "[admin] colour: unknown key"),
        ({"webhoook": {"path": "/x"}}, "[webhoook]: unknown section"),
        ({"wechat": {"token_mode": "fast"}}, "[wechat] token_mode"),
        ({"wechat": {"request_timeout_s": "soon"}}, "[wechat] request_timeout_s"),
        ({"pushes": {"workers": "0"}}, "[pushes] workers"),
        ({"pushes": {"quota_resume_time": "25:00"}}, "[pushes] quota_resume_time"),
        ({"followers": {"purge_on_unsubscribe": "maybe"}}, "[followers] purge_on_unsubscribe"),
        ({"webhook": {"encoding_aes_key": "", "require_encryption": "true"}},
         "[webhook] require_encryption"),
    ],
)
def test_each_bad_value_names_section_and_key(sections: dict[str, dict[str, object]],
                                              expected: str) -> None:
    found = problems(sections)
    assert any(p.startswith(expected) for p in found), found


def test_all_problems_are_reported_at_once() -> None:
    found = problems({"webhook": {"listen": "x", "token": None}, "wechat": {"max_clients": "-1"}})
    assert len(found) == 3


def test_remote_admin_needs_explicit_opt_in() -> None:
    cfg = load({"admin": {"listen": "0.0.0.0:8081", "allow_remote": "true"}})
    assert not cfg.admin.listen.loopback


def test_environment_overrides_the_file() -> None:
    cfg = load(env={"WXD_OFFICIAL_ACCOUNT_SECRET": "from-env", "WXD_WEBHOOK_PATH": "/hook",
                    "WXD_WXD_LOG_LEVEL": "debug"})
    assert cfg.official_account.secret == "from-env"
    assert cfg.webhook.path == "/hook"
    assert cfg.wxd.log_level == "debug"


def test_environment_can_supply_a_missing_secret_and_section() -> None:
    cfg = load({"official_account": {"secret": None}}, env={
        "WXD_OFFICIAL_ACCOUNT_SECRET": "s3cret",
    }, mini_program=False)
    assert cfg.official_account.secret == "s3cret"
    text = config_text("/tmp/x.db", mini_program=False)
    cfg = config.load_text(text, {"WXD_MINI_PROGRAM_APPID": "wx0123456789abcdef",
                                  "WXD_MINI_PROGRAM_SECRET": "m"})
    assert cfg.mini_program is not None and cfg.mini_program.secret == "m"


def test_bad_environment_value_is_named_like_the_key() -> None:
    found = problems({}, env={"WXD_WEBHOOK_LISTEN": "nope"})
    assert any(p.startswith("[webhook] listen") for p in found)


def test_secrets_never_appear_in_reprs_or_errors() -> None:
    cfg = load({"official_account": {"secret": "TOPSECRET-OA"}})
    text = repr(cfg)
    for secret in ("TOPSECRET-OA", ADMIN_TOKEN, AES_KEY, "testtoken", "mp-secret-value"):
        assert secret not in text
    bad = problems({"webhook": {"encoding_aes_key": "SECRETKEY" * 4 + "!"}})
    assert not any("SECRETKEY" in p for p in bad)


def test_unparsable_file_is_a_config_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.conf"
    path.write_text("this is not ini\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert "cannot parse" in info.value.problems[0]
    with pytest.raises(ConfigError):
        config.load(str(tmp_path / "missing.conf"))


def test_example_file_loads_and_documents_every_key() -> None:
    example = ROOT / "wxd.conf.example"
    cfg = config.load(str(example))
    assert cfg.wechat.api_base == "https://api.weixin.qq.com"
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(example)
    for section, keys in config.SPEC.items():
        assert parser.has_section(section), section
        for key, spec in keys.items():
            assert parser.has_option(section, key), f"[{section}] {key} undocumented"
            if spec.default is not None and not spec.secret:
                assert parser.get(section, key) == spec.default, f"[{section}] {key} default"


def test_every_config_field_is_in_the_spec() -> None:
    for name, cls in config.SECTION_TYPES.items():
        fields = {field.name for field in dataclasses.fields(cls)}
        assert fields == set(config.SPEC[name]), name
