"""The public /oauth/start and /oauth/callback pages (OA web authorization links).

tornado.web handlers over oauth_links.OAuthLinks, mounted on the public listener beside the
webhook. Every answer is a small plain HTML page (or a 302), never cached, never carrying the
code, the state or anything secret; the access log (webhook.log_request) has no query string.
"""

from __future__ import annotations

import html
import logging
from typing import Any

import tornado.web
from tornado.routing import URLSpec

from wxd.oauth_links import OAuthLinks, Page

log = logging.getLogger(__name__)

# Longer query values are refused before any lookup (WeChat's codes are 32 characters, the
# state at most 128 bytes, wxd's start tokens 32).
MAX_VALUE = 512
_TITLES = {200: "Linked", 302: "Redirecting"}


class _OAuthPage(tornado.web.RequestHandler):
    SUPPORTED_METHODS = ("GET",)

    def initialize(self, oauth: OAuthLinks) -> None:
        self.oauth = oauth

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        # The callback URL holds the code and state: no Referer to the return_url or elsewhere.
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Content-Security-Policy", "default-src 'none'")

    def check_xsrf_cookie(self) -> None:
        """GET only; no cookies are used."""

    def arg(self, name: str) -> str | None:
        """One query value: None when absent, or when repeated, not UTF-8 or too long (the
        page logic refuses None for whatever must be present)."""
        values = self.request.query_arguments.get(name)
        if not values:
            return None
        if len(values) != 1 or len(values[0]) > MAX_VALUE:
            return ""  # present but unusable: refused like a malformed value
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            return ""

    def render_page(self, page: Page) -> None:
        self.set_status(page.status)
        if page.location is not None:
            self.set_header("Location", page.location)
        title = _TITLES.get(page.status, "Not linked")
        self.finish(
            "<!doctype html><html><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{title}</title></head><body><p>{html.escape(page.message)}</p>"
            "</body></html>\n")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish(f"<!doctype html><p>{status_code} {html.escape(self._reason)}</p>\n")


class StartHandler(_OAuthPage):
    """GET /oauth/start?t=... → 302 to WeChat's authorize page (snsapi_base), or a 4xx page."""

    async def get(self) -> None:
        self.render_page(await self.oauth.start(self.arg("t")))


class CallbackHandler(_OAuthPage):
    """GET /oauth/callback?code=...&state=... → 302 to the return_url or a "linked" page; a
    4xx page (nothing linked) for a bad/expired/forged state, a missing code or WeChat's
    refusal."""

    async def get(self) -> None:
        code = self.arg("code")
        state = self.arg("state")
        page = await self.oauth.callback(code, state)
        if page.status >= 400:
            log.info("OAuth callback from %s refused: %d %s", self.request.remote_ip,
                     page.status, page.outcome)
        self.render_page(page)


def routes(oauth: OAuthLinks) -> list[URLSpec]:
    """The public OAuth routes (mounted beside the webhook route)."""
    kwargs = {"oauth": oauth}
    return [
        tornado.web.url(r"/oauth/start", StartHandler, kwargs),
        tornado.web.url(r"/oauth/callback", CallbackHandler, kwargs),
    ]
