"""The one table of what each admin route needs: handler route_name → HTTP method → scope.

Pure data, read by JsonHandler.prepare (to refuse) and the OpenAPI document (to state it).
ANY: any valid key or the admin token; PUBLIC: no authentication at all. A route or method
missing from the table needs "admin" (fail closed). The scope names are wxd.apikeys.SCOPES.
"""

from __future__ import annotations

from collections.abc import Mapping

ADMIN = "admin"
ANY = "any"
PUBLIC = "public"

ROUTE_SCOPES: Mapping[str, Mapping[str, str]] = {
    "healthz": {"GET": PUBLIC},
    "openapi": {"GET": ANY},
    "not_found": {method: ANY for method in ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT",
                                             "OPTIONS")},
    "metrics": {"GET": "console"},
    "stats": {"GET": "console"},
    "tokens": {"GET": "tokens:read"},
    "jsapi_ticket": {"GET": "tokens:read"},
    "jssdk_signature": {"POST": "tokens:read"},
    "mp_login": {"POST": "users:write"},
    "mp_decrypt": {"POST": "users:write"},
    "users": {"GET": "users:read"},
    "links": {"DELETE": "users:write"},
    "link_qrcodes": {"POST": "users:write"},
    "link_qrcode": {"GET": "users:read"},
    "link_oauth": {"POST": "users:write"},
    "link_oauth_status": {"GET": "users:read"},
    "pushes": {"GET": "pushes:read", "POST": "pushes:write"},
    "pushes_batch": {"POST": "pushes:write"},
    "push": {"GET": "pushes:read"},
    "push_action": {"POST": "pushes:write"},
    "templates": {"GET": "pushes:read"},
    "templates_refresh": {"POST": "pushes:write"},
    "backfill": {"GET": "backfill", "POST": "backfill"},
    "callbacks": {"GET": "callbacks"},
    "callback": {"GET": "callbacks"},
    "callback_retry": {"POST": "callbacks"},
    "callbacks_retry_dead": {"POST": "callbacks"},
    "keys": {"GET": ADMIN, "POST": ADMIN},
    "key": {"DELETE": ADMIN},
}


def required_scope(route_name: str, method: str) -> str:
    """The scope `method` on the route needs: a scope name, ANY or PUBLIC."""
    return ROUTE_SCOPES.get(route_name, {}).get(method.upper(), ADMIN)


def allows(scopes: frozenset[str], needed: str) -> bool:
    """Whether a holder of `scopes` may call a route that needs `needed`."""
    return needed in (ANY, PUBLIC) or ADMIN in scopes or needed in scopes
