"""The process's memory as the kernel sees it: resident bytes, the peak mark, and giving freed heap pages back."""

from __future__ import annotations


def status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; under jemalloc a purge of all arenas);
    True if it ran, False where neither is available (other platforms keep their allocator's behaviour).

    glibc keeps freed chunks mapped, so after a one-off phase that frees a lot — quantizing the bf16 base layer
    by layer — the process RSS stays at the dense size although the live bytes fell. Called once after such a
    phase, never per step (the pages a step frees are reused by the next one; trimming them costs page faults).
    """
    import ctypes
    import ctypes.util

    from effine.system.allocator import loaded

    jemalloc = loaded()
    if jemalloc:  # jemalloc as effine configures it never purges by itself: purge every arena once, now
        try:
            mallctl = ctypes.CDLL(jemalloc).mallctl
            return mallctl(b"arena.4096.purge", None, None, None, 0) == 0  # 4096: MALLCTL_ARENAS_ALL
        except (OSError, AttributeError):
            return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)  # returns 1 if pages were released, 0 if there were none: either way it ran
    return True


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs),
    so that the peak measured next is that of what follows only. False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
