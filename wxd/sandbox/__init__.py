"""The WeChat emulator: a seeded fake of api.weixin.qq.com plus the WeChat side of the webhook.

May import only stdlib, tornado, wxd.errors, wxd.wechat.crypto and wxd.wechat.messages; only the CLI, the demo
and tests import it.
"""

from __future__ import annotations

from wxd.sandbox.app import SandboxApplication, make_app
from wxd.sandbox.endpoints import Answer, Report, dispatch
from wxd.sandbox.population import Credentials, Person
from wxd.sandbox.runner import SandboxServer, SandboxThread, add_arguments, config_snippet, run
from wxd.sandbox.state import Call, FakeWeChat, WebhookConfig
from wxd.sandbox.templates import (
    DEFAULT_TEMPLATES,
    LEGACY_TEMPLATE_ID,
    NOTICE_TEMPLATE_ID,
    ORDER_TEMPLATE_ID,
    Template,
)
from wxd.sandbox.webhook_sender import Delivery, SignedRequest, WebhookSender

__all__ = [
    "DEFAULT_TEMPLATES",
    "LEGACY_TEMPLATE_ID",
    "NOTICE_TEMPLATE_ID",
    "ORDER_TEMPLATE_ID",
    "Answer",
    "Call",
    "Credentials",
    "Delivery",
    "FakeWeChat",
    "Person",
    "Report",
    "SandboxApplication",
    "SandboxServer",
    "SandboxThread",
    "SignedRequest",
    "Template",
    "WebhookConfig",
    "WebhookSender",
    "add_arguments",
    "config_snippet",
    "dispatch",
    "make_app",
    "run",
]
