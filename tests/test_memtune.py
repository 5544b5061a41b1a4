"""glibc malloc tuning at daemon start (gateway.memtune), in subprocesses of their own."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = "import json; from gateway import memtune; print(json.dumps(memtune.tune()))"


def _tune(env: dict[str, str]) -> dict[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return json.loads(done.stdout)


needs_glibc = pytest.mark.skipif(
    not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"), reason="glibc only"
)


@needs_glibc
def test_glibc_takes_a_fixed_mmap_threshold_and_two_arenas():
    """On glibc both settings are applied."""
    assert _tune({}) == {"MALLOC_MMAP_THRESHOLD_": 131072, "MALLOC_ARENA_MAX": 2}


@needs_glibc
def test_the_environment_wins():
    """A setting given in the environment (glibc's own spelling) is left alone."""
    assert _tune({"MALLOC_ARENA_MAX": "4"}) == {"MALLOC_MMAP_THRESHOLD_": 131072}


def test_tls_reads_are_64_kib_after_tuning():
    """The TLS read size of asyncio (a buffer of it per connection) is lowered to 64 KiB."""
    script = (
        "import asyncio.sslproto; from gateway import memtune; memtune.tune();"
        " print(asyncio.sslproto.SSLProtocol.max_size, memtune.trim())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=30
    )
    assert done.stdout.split() == ["65536", "True"]
