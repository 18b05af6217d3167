"""Process measurements shared by the benchmarks."""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM).

    Not getrusage's ru_maxrss: Linux carries the parent's peak over fork and exec, so a child started
    by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass  # not Linux: fall back to getrusage below
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
