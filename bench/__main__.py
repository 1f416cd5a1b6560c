"""`python -m bench [--quick] [--markdown FILE] [--only NAME ...]`: every benchmark, one table.

Runs each bench module's `run(quick)` in turn (a module that is missing or fails becomes an
ERROR row; the others still run), then prints the machine, the load generator of each benchmark
and one table of wxd against its same-run references (bench.common.format_table).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import sqlite3
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence

import tornado

from bench.common import Result, format_table, wrk_path

MODULES = ("bench_webhook", "bench_pushes", "bench_backfill", "bench_tokens", "bench_idle",
           "bench_callbacks")

# Used when a module does not state its own LOAD_GENERATOR string.
LOAD_GENERATORS = {
    "bench_webhook": "wrk on loopback, a Lua script cycling through pre-built distinct signed and "
                     "encrypted subscribe events: the same requests and connections for wxd, bare "
                     "Tornado and Tornado + wechatpy (connections in the notes)",
    "bench_pushes": "the sandbox with a fixed latency per template/send; the same pushes at the same "
                    "concurrency sent by wxd's workers, a bare keep-alive client (and tornado's "
                    "AsyncHTTPClient), and wechatpy in a thread pool",
    "bench_backfill": "a sandbox process per side serving the same seeded followers; wxd's "
                      "FollowerBackfill vs a sequential wechatpy user/get + batchget loop",
    "bench_tokens": "1,000 concurrent callers (coroutines for wxd, threads for wechatpy) asking the "
                    "sandbox, with a fixed latency, for the OA token",
    "bench_idle": "no load: wxd and a Tornado hello started the same way, readiness via a "
                  "NOTIFY_SOCKET (sd_notify READY=1), context switches from /proc/<pid>/task/*/status",
}


def machine() -> dict[str, str]:
    """The facts a reader needs to compare figures: CPUs, CPU model, Python, libraries."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    wrk = wrk_path()
    wrk_version = "not installed"
    if wrk:
        probe = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
        first = (probe.stdout or probe.stderr).split("\n")[0]
        wrk_version = first.split(" [")[0].split(" Copyright")[0].strip() or "wrk (version unknown)"
    return {
        "nproc": str(usable), "cpu": model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "tornado": tornado.version, "sqlite": sqlite3.sqlite_version,
        "os": f"{platform.system()} {platform.release()}", "wrk": wrk_version,
        "load": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),  # other work skews every figure
    }


def run_module(name: str, quick: bool) -> tuple[list[Result], str, float]:
    """(results, load generator, seconds); an import or run failure becomes one ERROR row."""
    started = time.perf_counter()
    load = LOAD_GENERATORS.get(name, "")
    try:
        module = importlib.import_module(f"bench.{name}")
        load = getattr(module, "LOAD_GENERATOR", load)
        results: list[Result] = list(module.run(quick))
    except Exception as exc:  # one broken benchmark must not hide the others
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        sys.stderr.write(f"bench.{name} failed:\n{traceback.format_exc()}\n")
        results = [Result(f"{name}: ERROR", "-", math.nan, notes={"error": detail[:300]})]
    return results, load, time.perf_counter() - started


def markdown(results: Sequence[Result], facts: dict[str, str], loads: dict[str, str],
             quick: bool, seconds: dict[str, float]) -> str:
    """The table as GitHub markdown, with the machine and the load generators."""
    lines = [f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['python']}, tornado "
             f"{facts['tornado']}, SQLite {facts['sqlite']}, {facts['os']}, {facts['wrk']}; load "
             f"average at start {facts['load']}. Mode: {'--quick' if quick else 'full'}.", "",
             "| benchmark | metric | wxd | reference | ref value | ratio | target | met |",
             "|---|---|---:|---|---:|---:|---|---|"]
    for r in results:
        ref = f"{r.reference:,.1f}" if r.reference is not None else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        met = {True: "yes", False: "**NO**", None: "-"}[r.met]
        cells = (r.benchmark, r.metric, f"{r.wxd:,.1f}", r.reference_name or "-", ref, ratio,
                 r.target or "-", met)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += ["", "Load generators:", ""]
    lines += [f"- `bench.{name}` ({seconds.get(name, 0):.0f} s): {load}" for name, load in loads.items()]
    notes = [f"- {r.benchmark}: {r.notes}" for r in results if r.notes]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs (under two minutes)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=MODULES,
                        help="run only these modules")
    args = parser.parse_args(argv)
    names = args.only or list(MODULES)
    facts = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()), flush=True)
    started = time.perf_counter()
    results: list[Result] = []
    loads: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for name in names:
        print(f"running bench.{name}{' --quick' if args.quick else ''} ...", flush=True)
        rows, loads[name], seconds[name] = run_module(name, args.quick)
        results.extend(rows)
        print(f"  done in {seconds[name]:.1f} s", flush=True)
    total = time.perf_counter() - started
    print()
    print(format_table(results))
    print("\nload generators:")
    for name, load in loads.items():
        print(f"  bench.{name}: {load}")
    print(f"\ntotal {total:.1f} s ({'quick' if args.quick else 'full'} mode)")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(markdown(results, facts, loads, args.quick, seconds))
        print(f"markdown written to {args.markdown}")
    return 1 if any(math.isnan(r.wxd) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
