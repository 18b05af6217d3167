"""The short summary of a GPU session's results folder (what `benchmarks/gpu_session.sh` wrote).

    python -m benchmarks.gpu_summary OUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.throughput import summary_lines


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m benchmarks.gpu_summary RESULTS_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])

    def load(name):
        path = out / name
        return json.loads(path.read_text()) if path.exists() else None

    smoke = load("smoke.json")
    if smoke:
        print(f"smoke: {smoke['device']} kernel={smoke['kernel']} rel err packed {smoke['max_rel_err_packed']:.2e} "
              f"masked {smoke['max_rel_err_masked']:.2e}, shard encoder {smoke.get('encode_flat_rel_err_packed', -1):.2e}"
              f" ok={smoke['ok']}")
    for name in ("throughput_gpu.json", "e2e_gpu.json", "throughput_gpu_compile.json"):
        res = load(name)
        print(f"{name}:" if res else f"{name}: none")
        if res:
            print("\n".join(summary_lines(res)))
    rows = load("runtime_gpu.json") or []
    for r in rows:
        print(f"runtime {r['geometry']} {r['setting']} K={r['k']} {r['variant']:<22} {r['ms']:9.2f} ms, "
              f"reduction {r['reduction']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
