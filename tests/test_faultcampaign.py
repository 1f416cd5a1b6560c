"""The fault campaign (bench/faultcampaign.py): one `wxd run` process under webhook events, pushes
and a backfill meets a 40164 outage of the emulator, then a full database filesystem (a tmpfs
filled by a ballast file), and afterwards, without a restart, every acknowledged event is
processed, every acknowledged push sent/delivered exactly once, the backfill done with every
follower, nothing left leased/sending, integrity_check ok.

The CI form (8 s outage, 4 s disk full; wxd's lease 10 s and unreachable probe 2 s) runs by
default; the full form (60 s, 20 s; wxd's default timers) only when slow tests are selected:
`pytest -m slow tests/test_faultcampaign.py` or WXD_SLOW_TESTS=1. Both need root to mount the
tmpfs and are skipped otherwise.
"""

from __future__ import annotations

import errno
import os
import pathlib
import sqlite3

import pytest

from bench.faultcampaign import (
    Figures,
    MountUnavailable,
    ScratchFilesystem,
    Settings,
    digest,
    run_campaign,
)


def check(figures: Figures) -> None:
    """The campaign's verdict: skip without a tmpfs; first what says the faults really met a
    load that never stopped, and what no fault may break; then every promise."""
    if figures.skipped is not None:
        pytest.skip(f"fault campaign: {figures.skipped}")
    summary = figures.summary()
    print(summary)  # shown with -s or on failure
    timeline = figures.timeline
    # Both faults really met the daemon, which never restarted and stopped cleanly.
    assert figures.starts == 1 and figures.stop_exit_code == 0, summary
    assert sum(figures.refused_calls.values()) > 0, summary
    assert figures.answers_503["webhook"] > 0 and "first 503" in timeline, summary
    assert figures.backfill_at["outage start (40164 to every call)"] == "running", summary
    assert "disk recovery: first event acknowledged" in timeline, summary
    # The load ran on both sides of both faults.
    assert figures.events_acked >= 50 and figures.pushes_acked >= 100, summary
    # Whatever 40164 did: nothing doubled, nothing stuck, the file intact.
    assert figures.duplicates == 0, summary
    assert not any(figures.leftover.values()), summary
    assert figures.integrity == "ok" and figures.integrity_after_stop == "ok", summary
    assert figures.problems == [], summary
    assert figures.events_processed == figures.events_acked, summary
    assert figures.backfill["state"] == "done", summary
    assert figures.followers_stored == figures.sandbox_followers, summary


def test_fault_campaign_ci_form(tmp_path: pathlib.Path) -> None:
    check(run_campaign(Settings.ci(seed=3), tmp_path))


@pytest.mark.slow
def test_fault_campaign_full_form(tmp_path: pathlib.Path) -> None:
    """60 s outage, 20 s disk full; runs only when slow tests are selected (see conftest.py)."""
    check(run_campaign(Settings.full(seed=11), tmp_path))


def test_scratch_filesystem_fills_empties_and_leaves_nothing(tmp_path: pathlib.Path) -> None:
    fs = ScratchFilesystem(tmp_path / "disk", size_mb=4)
    try:
        fs.mount()
    except MountUnavailable as exc:
        pytest.skip(str(exc))
    with fs:
        db = sqlite3.connect(fs.path / "x.db", isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("CREATE TABLE t (v BLOB)")
            assert fs.fill() > 3 * 2**20
            assert fs.free_bytes() < 4096
            with pytest.raises(OSError) as full:
                (fs.path / "more").write_bytes(b"x" * 8192)
            assert full.value.errno == errno.ENOSPC
            with pytest.raises(sqlite3.OperationalError, match="full"):
                db.execute("INSERT INTO t VALUES (?)", (os.urandom(64 * 1024),))
            fs.empty()
            db.execute("INSERT INTO t VALUES (?)", (os.urandom(64 * 1024),))
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()
    assert not fs.mounted and not fs.path.exists()
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        assert str(fs.path) not in mounts.read()


def test_digest_counts_problems_by_kind() -> None:
    problems = [
        "push p_abc (fc1-3) ended failed: errcode 40164, error_code rejected",
        "push p_xyz (fc1-12) ended failed: errcode 40164, error_code rejected",
        "follower oJoJ0Hb-r7CfRuBpo5L11mev6HeI: unionid None != 'u_1'",
    ]
    kinds = digest(problems)
    assert kinds.most_common(1)[0][1] == 2 and len(kinds) == 2
    assert "errcode 40164" in kinds.most_common(1)[0][0]
