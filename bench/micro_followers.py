"""Micro-benchmark of ingest.apply_user_infos, the backfill's storage path.

`PYTHONPATH=. python -m bench.micro_followers [--rows N] [--batch N] [--mp-users N]
[--baseline REV|none] [--dir DIR]`

Stores `--rows` (1,000,000) batchget-shaped follower infos (the sandbox's user/info shape:
everyone follows and has a unionid) into a fresh database opened by `Database.open` (WAL,
synchronous=FULL, the real schema), `--batch` (5,000) infos per `Database.write`, as the
backfill does; `--mp-users` MP users (20,000) share a unionid with one of the followers, so the
first pass also links them. Then a second pass stores the same infos again (every row a
conflict: a re-sync). Generating the infos is outside the timed region.

Prints wall and CPU seconds (user + system, all threads) per 100,000 rows: the first and last
100,000 of the first pass (the table grows) and the whole second pass; for the current
`wxd/store/ingest.py` and, side by side, for the one at git revision `--baseline` (HEAD), each in
its own fresh database, and whether both left identical tables. Older revisions kept the
function in `wxd/store/followers.py` or `wxd/followers.py`; the first of these paths that
defines it at the revision is used.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import os
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from wxd.sandbox.population import Credentials, generate_people
from wxd.sandbox.shapes import user_info
from wxd.store import ingest
from wxd.store.db import Database

Apply = Callable[..., list[str]]
PER = 100_000
EPOCH = 1_800_000_000.0   # observation times: one second per batch, pass 2 after pass 1


def batches(rows: int, batch: int) -> Iterator[list[dict[str, Any]]]:
    """The same follower infos on every call (seeded per batch)."""
    credentials = Credentials()
    for index, start in enumerate(range(0, rows, batch)):
        people = generate_people(min(batch, rows - start), 1000 + index, credentials,
                                 follow_ratio=1.0, mp_ratio=0.0, unionid_ratio=1.0)
        yield [user_info(person) for person in people]


@dataclass
class Pass:
    """(wall s, CPU s) of each batch of one pass."""

    times: list[tuple[float, float]] = field(default_factory=list)
    linked: int = 0

    def per_100k(self, first: int, last: int, batch: int) -> tuple[float, float]:
        chunk = self.times[first:last]
        rows = len(chunk) * batch
        return (sum(t[0] for t in chunk) * PER / rows, sum(t[1] for t in chunk) * PER / rows)


async def measure(apply: Apply, path: str, rows: int, batch: int, mp_users: int
                  ) -> tuple[list[Pass], str]:
    """Both passes on a fresh database at `path`; returns them and a digest of the tables."""
    db = await Database.open(path)
    try:
        every = max(1, rows // mp_users) if mp_users else 0
        mp_rows: list[tuple[str, str, float, float]] = []
        if every:
            for number, infos in enumerate(batches(rows, batch)):
                mp_rows += [(f"mp{number}_{i}", info["unionid"], EPOCH, EPOCH)
                            for i, info in enumerate(infos) if (number * batch + i) % every == 0]
        await db.write(lambda conn: conn.executemany(
            "INSERT INTO mp_users (mp_openid, unionid, created_at, updated_at)"
            " VALUES (?, ?, ?, ?)", mp_rows[:mp_users]))
        passes: list[Pass] = []
        for run in (1, 2):
            current = Pass()
            for number, infos in enumerate(batches(rows, batch)):
                observed = EPOCH + run * 1_000_000 + number

                def store(conn: Any, infos: Sequence[dict[str, Any]] = infos,
                          observed: float = observed, run: int = run) -> list[str]:
                    return apply(conn, infos, observed, observed + 0.5, run=run)

                wall, cpu = time.perf_counter(), time.process_time()
                current.linked += len(await db.write(store))
                current.times.append((time.perf_counter() - wall, time.process_time() - cpu))
            passes.append(current)
        digest = await db.read(_digest)
    finally:
        await db.close()
    return passes, digest


def _digest(conn: Any) -> str:
    hasher = hashlib.sha256()
    for table in ("followers ORDER BY oa_openid", "links ORDER BY unionid"):
        for row in conn.execute(f"SELECT * FROM {table}"):  # noqa: S608 (constant table names)
            hasher.update(repr(tuple(row)).encode())
    return hasher.hexdigest()[:16]


# Where apply_user_infos lived, newest first: the module that defines it at a revision is used.
BASELINE_PATHS = ("wxd/store/ingest.py", "wxd/store/followers.py", "wxd/followers.py")
# wxd modules a baseline may import by the name they had before the store/ package existed.
MOVED_MODULES = {"wxd.schema": "wxd.store.schema"}


def baseline_source(rev: str, root: str) -> tuple[str, str] | None:
    """(path, source) of the module defining apply_user_infos at git revision `rev`, or None."""
    for path in BASELINE_PATHS:
        try:
            source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, check=True,
                                    capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        if "def apply_user_infos(" in source:
            return path, source
    return None


def baseline(rev: str) -> Apply | None:
    """apply_user_infos at git revision `rev`, or None if git cannot tell."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = baseline_source(rev, root)
    if found is None:
        print(f"no baseline (no apply_user_infos in {', '.join(BASELINE_PATHS)} at {rev})",
              file=sys.stderr)
        return None
    path, source = found
    module = types.ModuleType(f"ingest_at_{rev}")
    sys.modules[module.__name__] = module   # dataclasses resolve annotations through it
    aliased = [old for old in MOVED_MODULES if old not in sys.modules]
    for old in aliased:
        sys.modules[old] = importlib.import_module(MOVED_MODULES[old])
    try:
        exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)  # noqa: S102
    except Exception as exc:  # a revision whose imports this tree no longer has
        print(f"no baseline ({rev}:{path} does not load here: {exc!r})", file=sys.stderr)
        return None
    finally:
        for old in aliased:
            del sys.modules[old]
    apply: Apply = module.apply_user_infos
    return apply


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--mp-users", type=int, default=20_000)
    parser.add_argument("--baseline", default="HEAD", help="git revision, or 'none'")
    parser.add_argument("--dir", default=None, help="where the databases go (default: tmp)")
    args = parser.parse_args(argv)
    if args.rows < 2 * PER or args.rows % args.batch or PER % args.batch:
        parser.error(f"--rows must be >= {2 * PER} and a multiple of --batch, "
                     f"which must divide {PER}")
    sides: list[tuple[str, Apply]] = []
    if args.baseline != "none" and (old := baseline(args.baseline)) is not None:
        sides.append((args.baseline, old))
    sides.append(("current", ingest.apply_user_infos))
    results: dict[str, tuple[list[Pass], str]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for name, apply in sides:
            path = os.path.join(directory, f"{len(results)}.db")
            results[name] = asyncio.run(measure(apply, path, args.rows, args.batch,
                                                args.mp_users))
            print(f"{name}: done", file=sys.stderr)
    head = PER // args.batch
    total = args.rows // args.batch
    lines = {
        "pass 1, first 100k": (0, 0, head),
        "pass 1, last 100k": (0, total - head, total),
        "pass 1, all": (0, 0, total),
        "pass 2 (re-sync), all": (1, 0, total),
    }
    names = list(results)
    print(f"apply_user_infos: {args.rows:,} infos in batches of {args.batch:,}, "
          f"{args.mp_users:,} MP users; seconds per 100k rows (wall / CPU)")
    print(f"{'':24}" + "".join(f"{name:>22}" for name in names)
          + ("   CPU ratio" if len(names) == 2 else ""))
    for label, (index, first, last) in lines.items():
        cells = [results[name][0][index].per_100k(first, last, args.batch) for name in names]
        ratio = f"   {cells[1][1] / cells[0][1]:.2f}x" if len(cells) == 2 else ""
        print(f"{label:24}" + "".join(f"{f'{w:.3f} / {c:.3f}':>22}" for w, c in cells) + ratio)
    print(f"{'links made (pass 1, 2)':24}" + "".join(
        f"{f'{r[0][0].linked:,}, {r[0][1].linked:,}':>22}" for r in results.values()))
    digests = {digest for _, digest in results.values()}
    if len(names) == 2:
        print("identical tables:", "yes" if len(digests) == 1 else "NO")
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
