"""Process measurements shared by the benchmarks."""
from __future__ import annotations

import logging
import os
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


def load_results(path) -> dict:
    """The results file: {label: {machine, command, sizes: {N: result}}}; empty if it does not exist yet."""
    import json
    from pathlib import Path

    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def measure_sizes(path, label: str, module: str, argv: list[str], sizes: list[int], measure, render) -> None:
    """Measure each size in turn, saving after each one (a long run keeps what it finished), then print."""
    import json
    import os
    import platform
    from pathlib import Path

    data = load_results(path)
    run = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
           "command": " ".join([f"python -m {module}", *argv]), "sizes": {}}
    for n in sizes:
        run["sizes"][str(n)] = measure(n)
        data[label] = run
        Path(path).write_text(json.dumps(data, indent=1))
    print(render({label: run}))


def render_tables(data: dict, columns: list[str], rows) -> str:
    """One markdown table per label of a results file. `columns`: headers, a trailing ':' right-aligns
    one ("wall s:"); `rows(n, result)` yields each row's cells for size n."""
    lines = []
    for label, run in data.items():
        head = [c.rstrip(":") for c in columns]
        rule = ["---:" if c.endswith(":") else "---" for c in columns]
        lines += [f"### {label}: {run['machine']}", "", "| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
        for n, r in sorted(run["sizes"].items(), key=lambda kv: int(kv[0])):
            lines += ["| " + " | ".join(cells) + " |" for cells in rows(int(n), r)]
        lines.append("")
    return "\n".join(lines)


def start_benchmark() -> None:
    """What every benchmark process sets first: timed INFO logs, a local Ray without token auth, and no
    cloud-metadata probe from boto's credential chain (traffic stays on loopback)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
