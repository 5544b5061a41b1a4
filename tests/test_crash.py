"""Crash trials in the test suite: ten SIGKILLs under load, each restarted and checked.

The trial and its invariants are in `tests/crashlib.py`; `bench/crash.py` runs hundreds.
"""

from __future__ import annotations

import pytest

from tests import crashlib
from tests.crashlib import FAST, Sent, TrialResult, original_part, run_trial
from tests.receiver import Received


@pytest.mark.parametrize("seed", range(1001, 1011))
async def test_sigkill_under_load_then_restart_keeps_every_invariant(
    tmp_path, ca, server_tls_context, seed
):
    """Every 250 delivered intact, nothing refused delivered, duplicates explained, log verifies."""
    result = await run_trial(tmp_path, ca, server_tls_context, seed=seed, settings=FAST)
    assert result.violations == [], result.summary()
    assert result.sent, "the trial sent nothing"


def test_original_part_takes_off_exactly_the_gateway_fields():
    """The checker strips DKIM, the decision and the Received field, and nothing else."""
    original = b"Received: from elsewhere\r\n\tby x;\r\nSubject: s\r\n\r\nbody\r\n"
    delivered = (
        b"DKIM-Signature: v=1;\r\n\tb=abc\r\n"
        b"X-Safeguarding-Decision: SG-01KAZ0000000000000000000000; verdict=released\r\n"
        b"Received: from agency.test ([127.0.0.1])\r\n\tby gateway.test; id x;\r\n\tdate\r\n"
        + original
    )
    assert original_part(delivered) == original
    assert original_part(b"Subject: s\r\n\r\nbody\r\n") is None


def test_checker_reports_what_it_must(tmp_path, ca):
    """Fabricated outcomes: a lost 250, a delivered NACK and a changed body are violations."""
    setup = crashlib.build_setup(tmp_path, ca, 1, FAST)
    for state in ("tmp", "data", "active", "deferred", "held"):
        (tmp_path / "spool" / state).mkdir(parents=True)
    (tmp_path / "audit").mkdir()
    ref = "SG-01KAZ0000000000000000000000"
    lost = Sent(
        "CRASHTOKEN-" + "1" * 24,
        secure=True,
        body=b"\r\nlost\r\n",
        outcome="ACK",
        code=250,
        ref=ref,
    )
    refused = Sent(
        "CRASHTOKEN-" + "2" * 24,
        secure=True,
        body=b"\r\n" + b"2" * 24 + b"\r\n",
        outcome="NACK",
        code=452,
    )
    refused.body = b"\r\n" + refused.token.encode() + b"\r\n"
    changed = Sent(
        "CRASHTOKEN-" + "3" * 24, secure=True, body=b"\r\n" + b"3" * 24 + b"\r\n", outcome="UNK"
    )
    changed.body = b"\r\n" + changed.token.encode() + b"\r\n"
    top = b"X-Safeguarding-Decision: " + ref.encode() + b"; v\r\nReceived: x\r\n\ty\r\n"
    messages = [
        Received(crashlib.SENDER, ("lead@nhs.net",), top + refused.body, "TLSv1.3"),
        Received(crashlib.SENDER, ("lead@nhs.net",), top + b"X" + changed.body, "TLSv1.3"),
        Received(crashlib.SENDER, ("x@gmail.com",), top + b"\r\nno token\r\n", "TLSv1.3"),
    ]
    result = TrialResult(seed=0)
    crashlib.check(setup, [lost, refused, changed], messages, 0, result)
    text = "\n".join(result.violations)
    assert f"{lost.token} ({ref}): answered 250 but never delivered" in text
    assert f"{refused.token}: delivered but answered NACK (452)" in text
    assert f"{changed.token}: body differs" in text
    assert "delivered to an insecure domain" in text
    assert "0 policy_loaded records" in text  # an empty log is no trial's log
