"""Shared benchmark plumbing: result rows, the table printer, process RSS, load-generator lookup."""

from __future__ import annotations

import os
import resource
import shutil
from dataclasses import dataclass, field


@dataclass
class Result:
    """One comparison: wxd's figure against a reference measured in the same run."""

    benchmark: str
    metric: str                 # e.g. "events/s", "pushes/s", "s", "MB"
    wxd: float
    reference_name: str = ""
    reference: float | None = None
    higher_is_better: bool = True
    target: str = ""            # e.g. ">= 0.6x bare tornado"
    met: bool | None = None
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.reference in (None, 0):
            return None
        assert self.reference is not None
        return self.wxd / self.reference


def format_table(results: list[Result]) -> str:
    header = ("benchmark", "metric", "wxd", "reference", "ref value", "ratio", "target", "met")
    rows = [header]
    for r in results:
        rows.append((
            r.benchmark, r.metric, f"{r.wxd:,.1f}", r.reference_name or "-",
            f"{r.reference:,.1f}" if r.reference is not None else "-",
            f"{r.ratio:.2f}x" if r.ratio is not None else "-",
            r.target or "-", {True: "yes", False: "NO", None: "-"}[r.met],
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.benchmark}: {r.notes}" for r in results if r.notes]
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb(pid: int | None = None) -> float:
    """Current RSS of a process (default: this one) in MB, from /proc."""
    with open(f"/proc/{pid or os.getpid()}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def wrk_path() -> str | None:
    """The wrk load generator if installed (`apt-get install wrk`), else None."""
    return shutil.which("wrk")
