"""Keep the daemon's memory flat: glibc malloc settings for a threaded server.

The daemon allocates many short-lived buffers of 64 KiB to a few hundred KiB (TLS read buffers,
DATA blocks, spool chunks) from the event loop and from worker threads. glibc's defaults suit
that badly: each thread that allocates gets an arena of its own (up to eight per CPU), and the
mmap threshold rises to the largest block freed so far, after which such buffers come from the
arenas instead of mmap and stay there, fragmented, after they are freed. Resident memory then
grows with every burst and does not come back.

`tune()` fixes the mmap threshold (which also stops it moving, and fixes the trim threshold
with it), so large buffers are mapped and returned to the system when freed, and caps the
arenas at two. It changes nothing on a C library without `mallopt` (musl): memory there is
what that library makes of it. Call it before any thread starts. MALLOC_ARENA_MAX and
MALLOC_MMAP_THRESHOLD_ in the environment are glibc's own spelling of the same settings and
are left to win when set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 * 1024  # glibc's default starting value, now fixed
ARENA_MAX = 2


def tune() -> dict[str, int]:
    """Apply the settings glibc accepts; return those applied (empty if none could be)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return {}
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
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
