"""Explicit links (QR link codes, OA web authorization) and their one-time link codes.

Run inside Database.write/read; imports wxd.store.callbacks, identity and mp_users only. bind()
and unbind() are the only functions that create, replace or remove an explicit link: anything
that must happen with such a change belongs in the same transaction as them, so they write the
user.linked / user.unlinked callbacks themselves (through the `outbox` they are given).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from wxd.store import mp_users
from wxd.store.callbacks import OFF, Outbox
from wxd.store.identity import (
    ExplicitLink,
    derived_oa_openid,
    explicit_link,
    link_conflict,
)

KINDS = ("qrcode", "oauth")


@dataclass(frozen=True)
class Bound:
    """What bind() did. `outcome`: "linked" (a new link, maybe replacing older explicit ones),
    "unchanged" (this exact explicit link existed), "unionid" (a unionid link already joins the
    two: nothing stored), "conflict" (refused: `conflict` says why). `replaced`: the explicit
    links removed to make room (the MP user's previous one, the OA openid's previous one)."""

    outcome: str
    link: ExplicitLink | None = None
    replaced: tuple[ExplicitLink, ...] = ()
    conflict: str | None = None


def bind(conn: sqlite3.Connection, mp_openid: str, oa_openid: str, source: str, now: float,
         code_id: str | None = None, *, outbox: Outbox = OFF) -> Bound:
    """Link an MP openid to an OA openid explicitly (`source` "qrcode" | "oauth").

    Refused ("conflict") when unionid facts disagree (identity.link_conflict): a unionid link
    is never overridden. An older explicit link of either openid is replaced (each openid is
    in at most one link). The MP user row is created when unknown. A new link writes its
    user.linked callback, each link it replaces a user.unlinked one (reason "replaced").
    """
    if source not in KINDS:
        raise ValueError(f"source must be one of {KINDS}")
    conflict = link_conflict(conn, mp_openid, oa_openid)
    if conflict is not None:
        return Bound("conflict", conflict=conflict)
    if derived_oa_openid(conn, mp_openid) == oa_openid:
        return Bound("unionid")
    existing = explicit_link(conn, mp_openid=mp_openid)
    if existing is not None and existing.oa_openid == oa_openid:
        return Bound("unchanged", existing)
    replaced: list[ExplicitLink] = []
    for old in (existing, explicit_link(conn, oa_openid=oa_openid)):
        if old is not None and old not in replaced:
            conn.execute("DELETE FROM explicit_links WHERE mp_openid = ?", (old.mp_openid,))
            replaced.append(old)
    mp_users.ensure(conn, mp_openid, now)
    conn.execute(
        "INSERT INTO explicit_links (mp_openid, oa_openid, source, code_id, linked_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (mp_openid, oa_openid, source, code_id, now),
    )
    made = ExplicitLink(mp_openid, oa_openid, source, now, code_id)
    for old in replaced:
        outbox.explicit(conn, "user.unlinked", old, now, reason="replaced")
    outbox.explicit(conn, "user.linked", made, now)
    return Bound("linked", made, tuple(replaced))


def unbind(conn: sqlite3.Connection, mp_openid: str, now: float | None = None, *,
           outbox: Outbox = OFF) -> ExplicitLink | None:
    """Remove the explicit link of an MP openid; the removed link, or None when it had none.
    A removal writes its user.unlinked callback (reason "removed", at `now`: required with an
    outbox)."""
    if outbox.types and now is None:
        raise ValueError("unbind with an outbox needs `now`")
    row = conn.execute(
        "DELETE FROM explicit_links WHERE mp_openid = ?"
        " RETURNING mp_openid, oa_openid, source, linked_at, code_id",
        (mp_openid,),
    ).fetchone()
    if row is None:
        return None
    removed = ExplicitLink(str(row[0]), str(row[1]), str(row[2]), float(row[3]), row[4])
    if now is not None:
        outbox.explicit(conn, "user.unlinked", removed, now, reason="removed")
    return removed


# Link codes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkCode:
    """A link_codes row (see the schema). Times are unix seconds."""

    id: str
    kind: str
    mp_openid: str
    token: str
    created_at: float
    expires_at: float
    state: str | None = None
    ticket: str | None = None
    qr_url: str | None = None
    return_url: str | None = None
    linked_at: float | None = None
    oa_openid: str | None = None
    auth_code: str | None = None
    replaced: str | None = None
    refused: str | None = None

    def status(self, now: float) -> str:
        """"linked", "expired" (at or after expires_at, never linked) or "pending"."""
        if self.linked_at is not None:
            return "linked"
        return "expired" if now >= self.expires_at else "pending"

    def to_json(self, now: float) -> dict[str, Any]:
        """The public status: id, status, and oa_openid/linked_at once linked, the OA openid
        of a replaced link (replaced), the reason the latest attempt was refused (error)."""
        answer: dict[str, Any] = {"id": self.id, "status": self.status(now),
                                  "expires_at": self.expires_at}
        if self.linked_at is not None:
            answer.update(oa_openid=self.oa_openid, linked_at=self.linked_at)
            if self.replaced:
                answer["replaced"] = {"oa_openid": self.replaced}
        elif self.refused:
            answer["error"] = self.refused
        return answer


_COLUMNS = ("id", "kind", "mp_openid", "token", "created_at", "expires_at", "state", "ticket",
            "qr_url", "return_url", "linked_at", "oa_openid", "auth_code", "replaced", "refused")


def _code(row: sqlite3.Row | None) -> LinkCode | None:
    return LinkCode(**{name: row[name] for name in _COLUMNS}) if row is not None else None


def create_code(conn: sqlite3.Connection, code: LinkCode) -> None:
    """Store a new pending code (its id, token and state are unique); the MP user it is for
    becomes known (an MP user row without session) if it was not."""
    mp_users.ensure(conn, code.mp_openid, code.created_at)
    conn.execute(
        "INSERT INTO link_codes (id, kind, mp_openid, token, created_at, expires_at, state,"
        " ticket, qr_url, return_url) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (code.id, code.kind, code.mp_openid, code.token, code.created_at, code.expires_at,
         code.state, code.ticket, code.qr_url, code.return_url),
    )


def code(conn: sqlite3.Connection, code_id: str) -> LinkCode | None:
    return _code(conn.execute("SELECT * FROM link_codes WHERE id = ?", (code_id,)).fetchone())


def code_by_token(conn: sqlite3.Connection, kind: str, token: str) -> LinkCode | None:
    """The code of a QR scene or an OAuth start token."""
    return _code(conn.execute("SELECT * FROM link_codes WHERE token = ? AND kind = ?",
                              (token, kind)).fetchone())


def code_by_state(conn: sqlite3.Connection, state: str) -> LinkCode | None:
    """The OAuth code whose authorize state this is."""
    return _code(conn.execute("SELECT * FROM link_codes WHERE state = ? AND kind = 'oauth'",
                              (state,)).fetchone())


@dataclass(frozen=True)
class Redeemed:
    """What redeem() did. `outcome`: "linked" (the code's link is made: `bound` says how),
    "repeat" (the code already linked this same OA openid: nothing changes), "used" (it linked
    someone else), "expired", "conflict" (bind refused; the code stays pending with
    refused = link_conflict). `code` is the code as it is afterwards."""

    outcome: str
    code: LinkCode
    bound: Bound | None = None


def redeem(conn: sqlite3.Connection, code_id: str, oa_openid: str, at: float, now: float, *,
           auth_code: str | None = None, outbox: Outbox = OFF) -> Redeemed | None:
    """Use a pending link code for `oa_openid`, judged at time `at` (when the person scanned
    or authorized; unix s): bind() its MP user with the code's kind as the source and mark the
    code linked, in one transaction. None when the code does not exist. Single use: once
    linked, the same OA openid again is a "repeat", anyone else "used".
    """
    found = code(conn, code_id)
    if found is None:
        return None
    if found.linked_at is not None:
        return Redeemed("repeat" if found.oa_openid == oa_openid else "used", found)
    if at >= found.expires_at:
        return Redeemed("expired", found)
    bound = bind(conn, found.mp_openid, oa_openid, found.kind, now, found.id, outbox=outbox)
    if bound.outcome == "conflict":
        conn.execute("UPDATE link_codes SET refused = 'link_conflict' WHERE id = ?", (found.id,))
        return Redeemed("conflict", code(conn, code_id) or found, bound)
    replaced = next((old.oa_openid for old in bound.replaced
                     if old.mp_openid == found.mp_openid), None)
    conn.execute(
        "UPDATE link_codes SET linked_at = ?, oa_openid = ?, auth_code = ?, replaced = ?,"
        " refused = NULL WHERE id = ?",
        (now, oa_openid, auth_code, replaced, found.id),
    )
    return Redeemed("linked", code(conn, code_id) or found, bound)


def refuse(conn: sqlite3.Connection, code_id: str, reason: str) -> None:
    """Record why the latest attempt on a pending code linked nothing (shown as its error)."""
    conn.execute("UPDATE link_codes SET refused = ? WHERE id = ? AND linked_at IS NULL",
                 (reason, code_id))


def prune_codes(conn: sqlite3.Connection, before: float) -> int:
    """Delete link codes that expired before `before` (linked or not); the links stay."""
    return conn.execute("DELETE FROM link_codes WHERE expires_at < ?", (before,)).rowcount
