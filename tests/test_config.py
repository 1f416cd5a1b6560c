"""Config parsing and validation: every bad value names its [section] key; env wins; no secrets."""

from __future__ import annotations

import configparser
import dataclasses
import pathlib
from collections.abc import Mapping

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


def documentation_problems(example: str,
                           sections: Mapping[str, config.Section] = config.SECTIONS) -> list[str]:
    """Every key of `sections` missing from the example text, or shown there with another default."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(example)
    found = []
    for section, spec in sections.items():
        for key, key_spec in spec.keys.items():
            if not parser.has_option(section, key):
                found.append(f"[{section}] {key} undocumented")
            elif (key_spec.default is not None and not key_spec.secret
                  and parser.get(section, key) != key_spec.default):
                found.append(f"[{section}] {key} default")
    return found


def test_example_file_loads_and_documents_every_key() -> None:
    example = ROOT / "wxd.conf.example"
    cfg = config.load(str(example))
    assert cfg.wechat.api_base == "https://api.weixin.qq.com"
    assert documentation_problems(example.read_text()) == []


def test_the_documentation_check_catches_an_undocumented_key() -> None:
    example = (ROOT / "wxd.conf.example").read_text()
    trimmed = example.replace("backoff_max_s = 600\n", "", 1)  # the first: [pushes]
    assert documentation_problems(trimmed) == ["[pushes] backoff_max_s undocumented"]
    assert documentation_problems(example.replace("workers = 8\n", "workers = 9\n")) == [
        "[pushes] workers default"]

    @dataclasses.dataclass(frozen=True)
    class Extra:
        colour: str = config.key("blue", config.string)

    table = {**config.SECTIONS, "extra": config.Section.of(Extra)}
    assert documentation_problems(example, table) == ["[extra] colour undocumented"]
    assert documentation_problems(example + "\n[extra]\ncolour = blue\n", table) == []


def test_every_section_field_is_a_declared_key() -> None:
    assert list(config.SECTIONS) == [f.name for f in dataclasses.fields(config.Config)]
    assert [name for name, spec in config.SECTIONS.items() if spec.optional] == ["mini_program"]
    assert config.SECTIONS["mini_program"].cls is config.AppConfig

    @dataclasses.dataclass(frozen=True)
    class Undeclared:
        colour: str

    with pytest.raises(TypeError, match=r"Undeclared\.colour"):
        config.Section.of(Undeclared)


def test_quota_resume_time_is_parsed_once_into_a_time_of_day() -> None:
    resume = load().pushes.quota_resume_time
    assert resume == config.TimeOfDay(0, 5) and resume.seconds == 300 and str(resume) == "00:05"
    assert load({"pushes": {"quota_resume_time": " 07:45 "}}).pushes.quota_resume_time.seconds == (
        7 * 3600 + 45 * 60)
    for bad in ("24:00", "7", "07:5", "aa:bb", "7:45", "07:60", ""):
        found = problems({"pushes": {"quota_resume_time": bad}})
        assert found == ["[pushes] quota_resume_time: must be HH:MM (Beijing time)"], bad


def test_a_duration_that_is_not_a_finite_number_is_refused() -> None:
    for bad in ("nan", "inf", "-inf"):
        with pytest.raises(ConfigError) as info:
            config.load_text(config_text("/tmp/x.db", {"wxd": {"shutdown_timeout_s": bad}}))
        assert "[wxd] shutdown_timeout_s" in str(info.value) and "must be a number" in str(info.value)
