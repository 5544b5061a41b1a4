"""Keep the daemon's memory flat: glibc malloc settings for a threaded server.

The daemon allocates many short-lived buffers of 64 KiB to a few hundred KiB (TLS read buffers,
DATA blocks, spool chunks) from the event loop and from worker threads. glibc's defaults suit
that badly: each thread that allocates gets an arena of its own (up to eight per CPU), and the
mmap threshold rises to the largest block freed so far, after which such buffers come from the
arenas instead of mmap and stay there, fragmented, after they are freed. Resident memory then
grows with every burst and does not come back.

`tune()` also lowers asyncio's TLS read size (`SSLProtocol.max_size`, 256 KiB: a buffer of that
size per TLS connection, zero-filled, plus reads of that size) to 64 KiB, a quarter of the memory
per session for a few more reads of a large upload. `trim()`, called every few seconds, gives
back to the system the heap pages a burst left free.

`tune()` fixes the mmap threshold (which also stops it moving, and fixes the trim threshold
with it), so large buffers are mapped and returned to the system when freed, and caps the
arenas at two. It changes nothing on a C library without `mallopt` (musl): memory there is
what that library makes of it. Call it before any thread starts. MALLOC_ARENA_MAX and
MALLOC_MMAP_THRESHOLD_ in the environment are glibc's own spelling of the same settings and
are left to win when set.
"""

from __future__ import annotations

import asyncio.sslproto
import ctypes
import ctypes.util
import os

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 * 1024  # glibc's default starting value, now fixed
ARENA_MAX = 2
TLS_READ_SIZE = 64 * 1024


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def tune() -> dict[str, int]:
    """Apply the settings glibc accepts; return those applied (empty if none could be)."""
    if getattr(asyncio.sslproto.SSLProtocol, "max_size", None) == 256 * 1024:
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_SIZE  # only the value it was built for
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = (
        ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("MALLOC_ARENA_MAX", _M_ARENA_MAX, ARENA_MAX),
    )
    return {
        env: value
        for env, option, value in settings
        if env not in os.environ and mallopt(option, value) == 1
    }


def trim() -> bool:
    """Give the heap's free pages back to the system (glibc's malloc_trim); False if absent."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    malloc_trim(0)
    return True
