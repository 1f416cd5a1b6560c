"""The `wxd` command line: argparse subcommands and exit codes.

With cliadmin.py the only code that reads files, the environment and argv, and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence

from wxd import __version__, cliadmin, config, daemon, demo, doctor, logsetup
from wxd.client import ApiCallFailed, ConnectFailed
from wxd.errors import ConfigError, StorageError
from wxd.sandbox import runner as sandbox_runner
from wxd.store import db

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_CONNECT = 0, 1, 2, 3


def _load_config(path: str) -> config.Config:
    return config.load(path, os.environ)


def cmd_check_config(args: argparse.Namespace) -> int:
    _load_config(args.config)
    print(f"{args.config}: ok")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    logsetup.configure(cfg.wxd.log_level, cfg.wxd.log_format)
    return asyncio.run(daemon.run(cfg, os.environ))


def cmd_backup(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    db.backup_file(cfg.wxd.database, args.dest)
    print(f"backed up {cfg.wxd.database} to {args.dest}")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    """The checklist; exit 0 all good, 1 a problem found, 2 cannot run (no readable file)."""
    if not os.path.isfile(args.config) or not os.access(args.config, os.R_OK):
        print(f"wxd doctor: cannot read {args.config}", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = _load_config(args.config)
    except ConfigError as exc:
        checks = doctor.config_failed(args.config, exc.problems)
    else:
        checks = asyncio.run(doctor.Doctor(cfg).run())
    if args.json:
        print(json.dumps({"ok": doctor.exit_code(checks) == 0,
                          "checks": [check.to_json() for check in checks]},
                         ensure_ascii=False, indent=2))
    else:
        print("\n".join(check.line() for check in checks))
    return doctor.exit_code(checks)


def cmd_demo(args: argparse.Namespace) -> int:
    logsetup.configure("error")
    return demo.run(args.keep_running, args.users, args.admin_port, args.webhook_port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wxd", description="WeChat Official Account + Mini Program integration daemon.")
    parser.add_argument("--version", action="version", version=f"wxd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-c", "--config", required=True, metavar="FILE", help="wxd.conf path")
        return p

    with_config("run", "run the daemon").set_defaults(func=cmd_run)
    with_config("check-config", "validate a config file").set_defaults(func=cmd_check_config)
    p = with_config("doctor", "check config, database, WeChat access, webhook and clock: each "
                    "line ✓/✗ with the fix (exit 0 all good, 1 a problem, 2 cannot run)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_doctor)
    p = with_config("backup", "consistent online copy of the database")
    p.add_argument("dest", help="destination file (must not exist)")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("sandbox", help="run the WeChat emulator",
                       description="Run the WeChat emulator (api.weixin.qq.com + the webhook side).")
    sandbox_runner.add_arguments(p)
    p.set_defaults(func=sandbox_runner.run)
    p = sub.add_parser("demo", help="run daemon + sandbox and walk through the whole job",
                       description="Run wxd against the built-in WeChat emulator on a temporary "
                                   "database and walk through the whole job.")
    p.add_argument("--keep-running", action="store_true",
                   help="stay up afterwards (admin API on 127.0.0.1:8081) until Ctrl-C")
    p.add_argument("--users", type=int, default=3000, help="simulated people (3000)")
    p.add_argument("--admin-port", type=int, default=None, help="admin port (0 = any)")
    p.add_argument("--webhook-port", type=int, default=None, help="webhook port (0 = any)")
    p.set_defaults(func=cmd_demo)
    cliadmin.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except StorageError as exc:
        print(f"wxd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except cliadmin.UsageError as exc:
        print(f"wxd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConnectFailed as exc:
        print(f"wxd: {exc}", file=sys.stderr)
        return EXIT_CONNECT
    except ApiCallFailed as exc:
        print(f"wxd: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_API
    except OSError as exc:
        print(f"wxd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    return code
