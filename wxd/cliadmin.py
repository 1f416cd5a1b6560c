"""CLI commands that talk to a running daemon's admin API: push, backfill, users, link, stats,
token, keys, callbacks.

Output is a human-readable table by default and JSON with --json. Exit codes:
0 ok, 1 API error, 2 usage/config error, 3 cannot connect.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from wxd import config
from wxd.client import AdminClient

EXIT_OK, EXIT_API, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line input (exit 2)."""


def client_for(args: argparse.Namespace) -> AdminClient:
    """Admin address and token from --admin-url/--token, WXD_ADMIN_URL/WXD_ADMIN_TOKEN, or -c."""
    url = args.admin_url or os.environ.get("WXD_ADMIN_URL")
    token = args.token or os.environ.get("WXD_ADMIN_TOKEN")
    if args.config:
        cfg = config.load(args.config, os.environ)
        client = AdminClient.from_config(cfg)
        return AdminClient(url or client.base_url, token or cfg.admin.token)
    if not url or not token:
        raise UsageError("give -c FILE, or --admin-url and --token (or WXD_ADMIN_URL/WXD_ADMIN_TOKEN)")
    return AdminClient(url, token)


def emit(args: argparse.Namespace, value: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2) if args.json else human(value))


def table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pairs(mapping: Mapping[str, Any]) -> str:
    return table(((k, json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else v)
                  for k, v in mapping.items()), ("field", "value"))


def when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# --- token / users / stats -------------------------------------------------------------------

def cmd_token(args: argparse.Namespace) -> int:
    value = client_for(args).get(f"/v1/tokens/{args.app}")
    emit(args, value, lambda v: v["access_token"] if args.quiet else pairs(
        {"access_token": v["access_token"], "expires_at": when(v["expires_at"])}))
    return EXIT_OK


def cmd_users(args: argparse.Namespace) -> int:
    keys = {"unionid": args.unionid, "mp_openid": args.mp_openid, "oa_openid": args.oa_openid}
    given = {k: v for k, v in keys.items() if v}
    if len(given) != 1:
        raise UsageError("give exactly one of --unionid, --mp-openid, --oa-openid")
    emit(args, client_for(args).get("/v1/users", **given), pairs)
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    def human(v: Mapping[str, Any]) -> str:
        flat: dict[str, Any] = {}
        for key, value in v.items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": x for k, x in value.items()})
            else:
                flat[key] = value
        return pairs(flat)

    emit(args, client_for(args).get("/v1/stats"), human)
    return EXIT_OK


# --- link ------------------------------------------------------------------------------------

def link_path(code_id: str) -> str:
    """The status route of a link code by its id's prefix (lq_: QR code, lo_: OAuth link)."""
    if code_id.startswith("lq_"):
        return f"/v1/links/qrcodes/{code_id}"
    if code_id.startswith("lo_"):
        return f"/v1/links/oauth/{code_id}"
    raise UsageError(f"not a link code id (lq_... or lo_...): {code_id!r}")


def cmd_link(args: argparse.Namespace) -> int:
    client = client_for(args)
    action = args.action
    if action in ("qrcode", "oauth", "remove") and not args.mp_openid:
        raise UsageError(f"wxd link {action} needs --mp-openid")
    if action == "qrcode":
        body: dict[str, Any] = {"mp_openid": args.mp_openid}
        if args.expires_in is not None:
            body["expires_in"] = args.expires_in
        code = client.post("/v1/links/qrcodes", body)
        emit(args, code, lambda v: f"{v['id']}  scan: {v['image_url']}\n"
             f"expires {when(v['expires_at'])}")
        if not args.wait:
            return EXIT_OK
        return wait_for_link(args, client, code["id"])
    if action == "oauth":
        body = {"mp_openid": args.mp_openid}
        if args.return_url:
            body["return_url"] = args.return_url
        if args.expires_in is not None:
            body["expires_in"] = args.expires_in
        link = client.post("/v1/links/oauth", body)
        emit(args, link, lambda v: f"{v['id']}  open in WeChat: {v['url']}\n"
             f"expires {when(v['expires_at'])}")
        return wait_for_link(args, client, link["id"]) if args.wait else EXIT_OK
    if action == "show":
        if not args.id:
            raise UsageError("wxd link show needs a link code id")
        emit(args, client.get(link_path(args.id)), pairs)
        return EXIT_OK
    removed = client.delete("/v1/links", mp_openid=args.mp_openid)
    emit(args, removed, lambda v: pairs(v["removed"]))
    return EXIT_OK


def wait_for_link(args: argparse.Namespace, client: AdminClient, code_id: str) -> int:
    """Poll a link code until it is linked (exit 0) or expired (exit 1)."""
    path = link_path(code_id)
    while True:
        status = client.get(path)
        if status.get("status") != "pending":
            break
        time.sleep(args.interval)
    if args.json:
        print(json.dumps(status, ensure_ascii=False, indent=2))
    elif status["status"] == "linked":
        print(f"linked to OA openid {status.get('oa_openid')} at {when(status.get('linked_at'))}")
    if status.get("status") != "linked":
        print(f"link code {code_id} {status.get('status')}", file=sys.stderr)
        return EXIT_API
    return EXIT_OK


# --- push ------------------------------------------------------------------------------------

def push_body(args: argparse.Namespace) -> dict[str, Any]:
    if args.file:
        with open(args.file, encoding="utf-8") as handle:
            body: dict[str, Any] = json.load(handle)
        return body
    recipients = {"unionid": args.to_unionid, "mp_openid": args.to_mp_openid,
                  "oa_openid": args.to_oa_openid}
    to = {k: v for k, v in recipients.items() if v}
    if len(to) != 1:
        raise UsageError("give exactly one of --to-unionid, --to-mp-openid, --to-oa-openid")
    if not args.template_id:
        raise UsageError("--template-id is required")
    data: dict[str, Any] = {}
    for item in args.data or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--data expects key=value, got {item!r}")
        data[key] = value
    body = {"to": to, "template_id": args.template_id, "data": data}
    if args.url:
        body["url"] = args.url
    if args.page:
        body["miniprogram"] = {"pagepath": args.page, **({"appid": args.mp_appid} if args.mp_appid else {})}
    if args.idempotency_key:
        body["idempotency_key"] = args.idempotency_key
    return body


def push_row(p: Mapping[str, Any]) -> list[Any]:
    error = p.get("error") or ""
    return [p.get("id"), p.get("status"), p.get("attempts"), p.get("msgid") or "",
            when(p.get("created_at")), error[:40]]


PUSH_HEADER = ("id", "status", "attempts", "msgid", "created", "error")


def cmd_push(args: argparse.Namespace) -> int:
    client = client_for(args)
    action = args.action
    if action == "send":
        value = client.post("/v1/pushes", push_body(args))
        emit(args, value, lambda v: f"{v['id']}  {v['status']}")
    elif action in ("show", "retry", "cancel"):
        if not args.id:
            raise UsageError(f"wxd push {action} needs a push id")
        path = f"/v1/pushes/{args.id}"
        value = client.get(path) if action == "show" else client.post(f"{path}/{action}")
        emit(args, value, pairs)
    else:  # list
        value = client.get("/v1/pushes", status=args.status, limit=args.limit, cursor=args.cursor)
        emit(args, value, lambda v: table((push_row(p) for p in v.get("pushes", [])), PUSH_HEADER)
             + (f"\nmore: --cursor {v['next_cursor']}" if v.get("next_cursor") else ""))
    return EXIT_OK


# --- callbacks -------------------------------------------------------------------------------

CALLBACK_HEADER = ("id", "type", "status", "attempts", "last", "created", "error")


def callback_row(c: Mapping[str, Any]) -> list[Any]:
    return [c.get("id"), c.get("type"), c.get("status"), c.get("attempts"),
            c.get("last_status") or "", when(c.get("created_at")), (c.get("last_error") or "")[:40]]


def cmd_callbacks(args: argparse.Namespace) -> int:
    client = client_for(args)
    if args.action == "list":
        value = client.get("/v1/callbacks", status=args.status, type=args.type,
                           limit=args.limit, cursor=args.cursor)
        emit(args, value, lambda v: table((callback_row(c) for c in v.get("callbacks", [])),
                                          CALLBACK_HEADER)
             + (f"\nmore: --cursor {v['next_cursor']}" if v.get("next_cursor") else ""))
    elif args.action == "show":
        if not args.id:
            raise UsageError("wxd callbacks show needs a callback id")
        emit(args, client.get(f"/v1/callbacks/{args.id}"), pairs)
    elif args.dead:  # retry --dead [--since]
        if args.id:
            raise UsageError("give a callback id or --dead, not both")
        value = client.post("/v1/callbacks/retry-dead", {"since": args.since})
        emit(args, value, lambda v: f"{v['retried']} dead callbacks are pending again")
    else:
        if not args.id:
            raise UsageError("wxd callbacks retry needs a callback id (or --dead)")
        emit(args, client.post(f"/v1/callbacks/{args.id}/retry"), pairs)
    return EXIT_OK


# --- backfill --------------------------------------------------------------------------------

def progress_line(status: Mapping[str, Any], width: int = 30) -> str:
    done, total = status.get("followers_done") or 0, status.get("total") or 0
    fraction = min(done / total, 1.0) if total else (1.0 if status.get("state") == "done" else 0.0)
    bar = "#" * int(fraction * width)
    eta = status.get("eta_s")
    eta_text = f" eta {eta:.0f}s" if isinstance(eta, int | float) and status.get("state") == "running" else ""
    rate = status.get("rate_per_s")
    rate_text = f" {rate:,.0f}/s" if isinstance(rate, int | float) and rate else ""
    notes = ", ".join(
        ([f"{status['skipped']:,} skipped"] if status.get("skipped") else [])
        + ([f"restarted from the head {status['restarts_from_head']}x"]
           if status.get("restarts_from_head") else []))
    return (f"[{bar.ljust(width)}] {fraction:6.1%} {done:,}/{total:,} followers "
            f"{status.get('state')}{rate_text}{eta_text}" + (f" ({notes})" if notes else ""))


def cmd_backfill(args: argparse.Namespace) -> int:
    client = client_for(args)
    if args.status_only:
        status = client.get("/v1/backfill")
    else:
        status = client.post("/v1/backfill", {"from_start": True} if args.from_start else None)
    tty = sys.stdout.isatty() and not args.json
    last_printed = 0.0
    while not args.no_wait and status.get("state") == "running":
        now = time.monotonic()
        if tty:
            print("\r" + progress_line(status), end="", flush=True)
        elif now - last_printed >= args.interval * 5 or not last_printed:
            print(progress_line(status), flush=True)
            last_printed = now
        time.sleep(args.interval)
        status = client.get("/v1/backfill")
    if tty:
        print("\r" + progress_line(status))
    elif not args.json:
        print(progress_line(status))
    if args.json:
        print(json.dumps(status, ensure_ascii=False, indent=2))
    if status.get("state") in ("failed", "paused"):
        print(f"backfill {status['state']}: {status.get('last_error') or ''}", file=sys.stderr)
        return EXIT_API
    if status.get("state") == "done" and status.get("complete") is False:
        print("backfill done, but the follower list ended early (a stale cursor): nobody was "
              "marked unsubscribed; run `wxd backfill` again later", file=sys.stderr)
    return EXIT_OK


# --- keys ------------------------------------------------------------------------------------

KEY_HEADER = ("name", "scopes", "created", "last used")


def cmd_keys(args: argparse.Namespace) -> int:
    client = client_for(args)
    if args.action == "create":
        if not args.name or not args.scopes:
            raise UsageError("wxd keys create NAME --scopes SCOPE[,SCOPE...]")
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
        value = client.post("/v1/keys", {"name": args.name, "scopes": scopes})
        emit(args, value, lambda v: f"{v['key']}\n(key {v['name']!r} with scopes "
             f"{','.join(v['scopes'])}; shown once: only a hash of it is stored)")
    elif args.action == "revoke":
        if not args.name:
            raise UsageError("wxd keys revoke NAME")
        value = client.delete("/v1/keys/" + urllib.parse.quote(args.name, safe=""))
        emit(args, value, lambda v: f"key {v['name']!r} revoked")
    else:  # list
        value = client.get("/v1/keys")
        emit(args, value, lambda v: table(
            ([k["name"], ",".join(k["scopes"]), when(k["created_at"]),
              when(k["last_used_at"]) or "never"] for k in v.get("keys", [])), KEY_HEADER))
    return EXIT_OK


# --- parser ----------------------------------------------------------------------------------

def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the admin-client subcommands on the main parser."""

    def client_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-c", "--config", metavar="FILE", help="read admin address and token from it")
        p.add_argument("--admin-url", help="e.g. http://127.0.0.1:8081 (or WXD_ADMIN_URL)")
        p.add_argument("--token", help="admin bearer token (or WXD_ADMIN_TOKEN)")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        return p

    p = client_parser("token", "print the central access_token of the OA or the MP")
    p.add_argument("app", choices=("oa", "mp"))
    p.add_argument("-q", "--quiet", action="store_true", help="print only the token")
    p.set_defaults(func=cmd_token)

    p = client_parser("users", "look up a linked identity")
    p.add_argument("--unionid")
    p.add_argument("--mp-openid")
    p.add_argument("--oa-openid")
    p.set_defaults(func=cmd_users)

    p = client_parser("link", "link an MP user without unionid: QR link codes, OAuth links")
    p.add_argument("action", choices=("qrcode", "oauth", "show", "remove"))
    p.add_argument("id", nargs="?", help="link code id (show)")
    p.add_argument("--mp-openid", help="the Mini Program user to link (qrcode, oauth, remove)")
    p.add_argument("--expires-in", type=int, help="seconds the code is valid (600)")
    p.add_argument("--return-url", help="oauth: where the browser goes once linked")
    p.add_argument("--wait", action="store_true",
                   help="qrcode/oauth: wait until linked (exit 0) or expired (exit 1)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls (--wait)")
    p.set_defaults(func=cmd_link)

    client_parser("stats", "counts: followers, links, pushes, tokens").set_defaults(func=cmd_stats)

    p = client_parser("push", "send, show, list, retry or cancel template pushes")
    p.add_argument("action", choices=("send", "show", "list", "retry", "cancel"))
    p.add_argument("id", nargs="?", help="push id (show, retry, cancel)")
    p.add_argument("--to-unionid")
    p.add_argument("--to-mp-openid")
    p.add_argument("--to-oa-openid")
    p.add_argument("--template-id")
    p.add_argument("--data", action="append", metavar="KEY=VALUE", help="template value (repeat)")
    p.add_argument("--url", help="link opened on tap")
    p.add_argument("--page", help="mini program page path to open (miniprogram.pagepath)")
    p.add_argument("--mp-appid", help="mini program appid (default: the configured one)")
    p.add_argument("--idempotency-key")
    p.add_argument("--file", help="a JSON push body (POST /v1/pushes shape)")
    p.add_argument("--status", help="list: filter by status")
    p.add_argument("--limit", type=int, default=20, help="list: page size")
    p.add_argument("--cursor", help="list: continue after this cursor")
    p.set_defaults(func=cmd_push)

    p = client_parser("keys", "create, list or revoke scoped API keys for the admin API")
    p.add_argument("action", choices=("create", "list", "revoke"))
    p.add_argument("name", nargs="?", help="key name (create, revoke)")
    p.add_argument("--scopes", help="create: comma-separated, e.g. tokens:read,pushes:write")
    p.set_defaults(func=cmd_keys)

    p = client_parser("callbacks", "list, show or retry the callbacks sent to the backend")
    p.add_argument("action", choices=("list", "show", "retry"))
    p.add_argument("id", nargs="?", help="callback id (show, retry)")
    p.add_argument("--status", choices=("pending", "done", "dead"), help="list: filter by status")
    p.add_argument("--type", help="list: filter by type (e.g. push.delivered)")
    p.add_argument("--limit", type=int, default=20, help="list: page size")
    p.add_argument("--cursor", help="list: continue after this cursor")
    p.add_argument("--dead", action="store_true", help="retry: every dead callback (see --since)")
    p.add_argument("--since", type=float, default=0.0,
                   help="retry --dead: only those dead since this unix time")
    p.set_defaults(func=cmd_callbacks)

    p = client_parser("backfill", "start the follower backfill and show its progress")
    p.add_argument("--no-wait", action="store_true", help="start and return at once")
    p.add_argument("--status-only", action="store_true", help="show progress without starting")
    p.add_argument("--from-start", action="store_true",
                   help="begin a new run at the head of the follower list instead of resuming "
                        "a paused or failed run at its saved cursor")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between progress polls")
    p.set_defaults(func=cmd_backfill)
