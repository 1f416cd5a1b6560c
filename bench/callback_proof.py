"""The kill loop's callback accounting: which callbacks the acknowledged facts must have produced
(read from the database file after the daemon exited) and what the receiver got.

Promises checked: every fact wxd acknowledged has its callback row (a follow or unfollow: the
row of its id, derived from the event's dedupe key; a text message: its message.received; a
push that WeChat accepted, reported or that failed: push.sent / .delivered / .failed), every row
ended `done`, every row reached the receiver at least once with a valid signature, and the
receiver got nothing wxd does not know. Duplicates (a POST answered but its outcome lost to a
kill) are counted, not refused: at least once allows them.
"""

from __future__ import annotations

import hmac
import json
import pathlib
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wxd.callbacks import signature
from wxd.store.callbacks import derived_id


def verifier(secret: str) -> Callable[[str, bytes], bool]:
    """A receiver's check of Wxd-Signature (the same rule as the README's snippet)."""
    def verify(header: str, body: bytes) -> bool:
        fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
        stamp = fields.get("t", "")
        return stamp.isdigit() and hmac.compare_digest(
            signature(secret.encode(), int(stamp), body), header)
    return verify


@dataclass(frozen=True)
class Fact:
    """An acknowledged event or message. `superseded`: a later event of the same person was
    acknowledged too, so this one may have been applied after it (stale: no callback)."""

    kind: str
    dedupe_key: str
    superseded: bool = False


@dataclass
class CallbackFigures:
    written: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    delivered: int = 0       # distinct ids answered 2xx
    duplicates: int = 0      # 2xx answers beyond the first per id
    stale_events: int = 0    # superseded events applied late (no callback, by design)
    unverified: int = 0

    def summary(self) -> str:
        return (f"callbacks: {self.written} written {dict(self.by_type)}, {self.requests} POSTs, "
                f"{self.delivered} delivered, {self.duplicates} duplicates, "
                f"{self.stale_events} events superseded before they were applied")


def read_callbacks(path: pathlib.Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute("SELECT * FROM callbacks ORDER BY seq")]
    finally:
        conn.close()


def check_callbacks(rows: Iterable[Mapping[str, Any]], facts: Iterable[Fact],
                    pushes: Mapping[str, Mapping[str, Any]], accepted: Counter[str],
                    requests: int, unverified: int) -> tuple[CallbackFigures, list[str]]:
    """(figures, problems) of a run: `rows` the callbacks table, `facts` the acknowledged
    events and messages, `pushes` the push rows by id, `accepted` the receiver's 2xx answers by
    callback id, `unverified` how many requests failed the signature check."""
    rows = list(rows)
    fig = CallbackFigures(written=len(rows), requests=requests, unverified=unverified)
    problems: list[str] = []
    by_id = {row["id"]: row for row in rows}
    fig.by_type = Counter(row["type"] for row in rows)
    for fact in facts:
        if derived_id(fact.kind, fact.dedupe_key) in by_id:
            continue
        if fact.superseded and fact.kind.startswith("follower."):
            fig.stale_events += 1
            continue
        problems.append(f"acknowledged {fact.dedupe_key} has no {fact.kind} callback")
    push_kinds: dict[str, Counter[str]] = {}
    for row in rows:
        if row["type"].startswith("push."):
            push_kinds.setdefault(json.loads(row["data"])["id"], Counter())[row["type"]] += 1
    for push_id, push in pushes.items():
        wanted: Counter[str] = Counter()
        if push["msgid"] is not None:
            wanted["push.sent"] = 1
        if push["status"] in ("delivered", "failed"):
            wanted[f"push.{push['status']}"] = 1
        found = push_kinds.pop(push_id, Counter())
        if found != wanted:
            problems.append(f"push {push_id} ({push['status']}, msgid {push['msgid']}) has "
                            f"callbacks {dict(found)}, expected {dict(wanted)}")
    problems += [f"callbacks {dict(kinds)} for push {push_id}, which is not in the database"
                 for push_id, kinds in push_kinds.items()]
    for row in rows:
        if row["status"] != "done":
            problems.append(f"callback {row['id']} ({row['type']}) ended {row['status']}: "
                            f"{row['last_error']}")
        elif not accepted[row["id"]]:
            problems.append(f"callback {row['id']} ({row['type']}) is done but the receiver "
                            "never answered it 2xx")
    problems += [f"the receiver got {key}, which wxd never wrote" for key in accepted
                 if key not in by_id]
    fig.delivered = sum(1 for key in accepted if key in by_id)
    fig.duplicates = sum(accepted.values()) - len(accepted)
    if unverified:
        problems.append(f"{unverified} callback requests failed the signature check")
    return fig, problems
