"""The WeChat emulator: a seeded fake of api.weixin.qq.com plus the WeChat side of the webhook.

Faults real WeChat produces are switched on through FakeWeChat's fault switches (switches.py)
or POST /_sandbox/faults (control.py); faults.py holds the one mechanism behind both.

May import only stdlib, tornado, wxd.errors, wxd.wechat.crypto and wxd.wechat.messages; only the CLI, the demo
and tests import it.
"""

from __future__ import annotations

from wxd.sandbox.app import SandboxApplication, make_app
from wxd.sandbox.endpoints import Answer, Report, dispatch
from wxd.sandbox.faults import DUPLICATE_MODES, REPORT_MODES, FaultRule
from wxd.sandbox.population import Credentials, Person
from wxd.sandbox.runner import SandboxServer, SandboxThread, add_arguments, config_snippet, run
from wxd.sandbox.state import Call, FakeWeChat, WebhookConfig
from wxd.sandbox.switches import TOKEN_REFUSALS
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
    "DUPLICATE_MODES",
    "LEGACY_TEMPLATE_ID",
    "NOTICE_TEMPLATE_ID",
    "ORDER_TEMPLATE_ID",
    "REPORT_MODES",
    "TOKEN_REFUSALS",
    "Answer",
    "Call",
    "Credentials",
    "Delivery",
    "FakeWeChat",
    "FaultRule",
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
