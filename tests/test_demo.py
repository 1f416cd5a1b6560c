"""`wxd demo` (the README's first command) runs the whole job and ends 0."""

from __future__ import annotations

import subprocess
import sys


def test_demo_walks_through_the_whole_job() -> None:
    proc = subprocess.run([sys.executable, "-m", "wxd", "demo", "--users", "1500"],
                          capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "2. backfill:" in out and "existing followers synced" in out
    assert "4. MP login:" in out and "-> oa_openid o" in out
    assert "5. push" in out and ": delivered" in out and "1 time(s)" in out
    assert "refused" in out and "recipient_not_following" in out
    assert "7. stats:" in out
    # The second account, without Open Platform: linked by QR code, then by OAuth.
    assert "second account without Open Platform" in out
    assert "8. QR link code lq_" in out and "linked by qrcode to oa_openid o" in out
    assert "9. OAuth link lo_" in out and "linked by oauth to oa_openid o" in out
    assert out.count("push by mp_openid p_") == 2 and out.count(": delivered to o") == 2
    assert "secret" not in out.lower()
