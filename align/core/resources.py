"""What the process uses, for logs and benchmarks: its resident memory now and at its peak (Linux; None elsewhere
for the current figure)."""

from __future__ import annotations

import os
import resource
import sys


def resident_gb() -> float | None:
    """Resident memory of this process now, in GiB (from /proc; None where there is no /proc)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**30, 3)


def peak_resident_gb() -> float:
    """The most resident memory this process has held, in GiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)
