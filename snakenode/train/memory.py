"""The worker's own memory: resident and peak RSS from /proc, and glibc malloc tuning (Linux).

Each hop reports its own peak (`reset_peak_rss`), and the heap is kept from growing hop after hop
(`tune_malloc`, `trim_malloc`).
"""

from __future__ import annotations

import os


def proc_status_mb(field: str = "VmRSS") -> float:
    """A kB field of /proc/self/status in MB (VmRSS: resident memory; RssFile: its file-backed part)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mb() -> float:
    return proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def tune_malloc(mmap_threshold: int = 256 * 1024) -> None:
    """glibc raises its mmap threshold dynamically, after which freed multi-MB tensors stay in the heap
    and RSS only grows. A fixed threshold returns big blocks to the OS at free.

    The threshold sits below an LM's per-token-row activations (SmolLM2 at 256 tokens: 256 x 576 fp32 =
    576 KB): heap-allocated activations that outlive the temporaries around them (checkpoint inputs,
    the window's saved tensors) otherwise leave holes the next layer cannot reuse, and the heap grows by
    ~5 MB per layer per pass. Measured on a SmolLM2-135M one-block hop (batch 1 x 256): peak 391-396 MB at
    1 MB, 263 MB at 256 KB, 262 MB at 128 KB, for ~20% more step time (page faults of fresh mappings;
    2.1 -> 2.6 s). Capping glibc's arenas (M_ARENA_MAX=2) gave 311 MB at 1 MB and nothing more at 256 KB.
    SNAKENODE_MMAP_THRESHOLD overrides (bytes; 0 = glibc's dynamic default) to trade memory for speed."""
    env = os.environ.get("SNAKENODE_MMAP_THRESHOLD")
    if env is not None:
        mmap_threshold = int(env)
    if mmap_threshold <= 0:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, int(mmap_threshold))          # M_MMAP_THRESHOLD (also disables the dynamic rule)
    except (OSError, AttributeError):
        pass


def trim_malloc() -> None:
    """Give freed heap pages back to the OS (glibc): loading layers leaves holes that would otherwise
    count as resident memory for the rest of the hop."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so each hop reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
