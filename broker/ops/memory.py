"""Give memory freed after large deliveries back to the OS (glibc; a no-op elsewhere).

glibc serves an allocation of at least the mmap threshold with its own mapping, unmapped as
soon as it is freed. But the threshold is dynamic: freeing such a block raises it to that
block's size (up to 32 MiB), so after one 4 MB body every later one comes from the heap, and
a heap only shrinks from its top: after a burst of large tasks the daemon kept its peak for
good (321 MB -> 1,965 MB after 200 tasks of 4 MB, and stayed there). Fixing the threshold
keeps every large buffer in its own mapping; trimming once idle returns the free pages the
smaller ones (frames, decoded pieces) left in the heaps of every arena.
"""

import ctypes
import platform

import structlog

log = structlog.get_logger("swarm.memory")

# mallopt's parameter number for the mmap threshold (malloc.h); setting it also turns the
# dynamic adjustment off.
M_MMAP_THRESHOLD = -3
# Bodies and replies from 1 MiB up get a mapping of their own, returned when freed; smaller
# allocations stay on the heap, where mapping each would cost a system call per frame.
MMAP_THRESHOLD_BYTES = 1024 * 1024


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    return libc


_LIBC = _glibc()


def map_large_buffers(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process. False where there is no glibc."""
    if _LIBC is None:
        return False
    done = bool(_LIBC.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold_bytes)))
    if not done:
        log.warning("mmap_threshold_refused", threshold_bytes=threshold_bytes)
    return done


def trim() -> bool:
    """Return the heaps' free pages to the OS (malloc_trim(0)): True if some were. Takes
    the arenas' locks while it walks them: call it off the event loop, when idle."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(ctypes.c_size_t(0)))
