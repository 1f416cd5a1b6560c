"""Backfill routes: POST /v1/backfill (start or resume, idempotent) and GET /v1/backfill (progress).

Translates FollowerBackfill's status into JSON; no storage or WeChat calls here.
"""

from __future__ import annotations

from typing import Any

from tornado.routing import URLSpec

from wxd.admin.base import ApiError, JsonHandler
from wxd.backfill import FollowerBackfill


class BackfillHandler(JsonHandler):
    """GET: the status document. POST: start a run.

    POST answers 202 + status when a run started or resumed, 200 + status when one was already
    running, and 409 `backfill_paused` (with the status) while a pause lasts (45009, the token
    budget, WeChat unreachable: `paused` says which); a body of `{"force": true}` resumes a
    paused run at once (e.g. after clear_quota, or after adding the IP to the whitelist).
    `{"from_start": true}` starts a new run at the head of the list instead of resuming a
    paused or failed one at its saved cursor (409 `backfill_running` while a run is active).
    """

    route_name = "backfill"

    def initialize(self, backfill: FollowerBackfill, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self._backfill = backfill

    def get(self) -> None:
        self.send_json(self._backfill.status())

    async def post(self) -> None:
        body = self.json_body() if self.request.body.strip() else {}
        force, from_start = (self._flag(body, name) for name in ("force", "from_start"))
        started, status = await self._backfill.begin_run(force, from_start)
        if started:
            self.send_json(status, status=202)
        elif status["state"] == "paused" and not status["active"]:
            reason = (status.get("paused") or {}).get("reason", "quota")
            why = {"unreachable": "WeChat is unreachable for wxd",
                   "token_budget": "the daily token budget is spent"}.get(
                       reason, "the daily quota is spent (45009)")
            raise ApiError(409, "backfill_paused",
                           f"{why}; the backfill resumes by itself (paused_until, or once a "
                           "token fetch succeeds), or send {\"force\": true} to resume now",
                           backfill=status)
        elif not status["active"]:
            raise ApiError(503, "unavailable", "the backfill is shutting down", backfill=status)
        elif from_start:
            raise ApiError(409, "backfill_running",
                           "a backfill run is active; from_start applies once it has stopped, "
                           "paused, failed or finished", backfill=status)
        else:
            self.send_json(status)

    @staticmethod
    def _flag(body: dict[str, Any], name: str) -> bool:
        value = body.get(name, False)
        if not isinstance(value, bool):
            raise ApiError(400, "invalid_field", f"'{name}' must be true or false", field=name)
        return value


def routes(common: dict[str, Any], backfill: FollowerBackfill) -> list[URLSpec]:
    return [URLSpec(r"/v1/backfill", BackfillHandler, {**common, "backfill": backfill})]
