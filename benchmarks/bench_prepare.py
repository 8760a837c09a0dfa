"""Preparing a folder of photos: decoding speed and peak memory.

1. Decoding throughput (images/s) of ``--n`` generated JPEGs (crops of scikit-learn's
   sample photos plus noise, sides of 300-640 px, several aspect ratios) into
   ``--size`` px squares: every CPU of the process's affinity on threads (what prepare
   does) against one worker and against a process pool; and, on one thread, JPEG
   decoding at reduced scale (``Image.draft``) against a full decode.
2. Peak resident memory of the prepare stage on ``--rss-sizes`` generated 224 px images
   stored at 224 px, next to the size of what it writes (goal: peak <= 2x that + 1 GB):
   ``RUSAGE_CHILDREN``'s ``ru_maxrss`` in a small launcher process. (Linux counts the
   memory a child had before ``exec`` - its parent's, at fork - in its ``ru_maxrss``, so
   the launcher must be small, not this benchmark with its decoded arrays.)

Figures and ratios are measured in the same run; nothing is asserted.

    python benchmarks/bench_prepare.py --n 10000
    python benchmarks/bench_prepare.py --n 500 --rss-sizes 500   # quick
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageOps

from transferlab.compose import compose
from transferlab.data.sources import decode_image, decode_images, decode_workers

REPO = Path(__file__).resolve().parents[1]
CLASSES = 10
# Runs the command in argv, then prints the peak RSS (KiB) of its children.
LAUNCHER = ("import resource, subprocess, sys; "
            "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def make_photos(root: Path, n: int, *, sides: tuple[int, int], seed: int = 0) -> list[Path]:
    """``n`` JPEGs in ``CLASSES`` class folders: random crops of the sample photos, resized to
    random sides in ``sides`` (square ones when the range is a single size), with noise."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photos
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = rng.integers(200, photo.shape[0] + 1), rng.integers(200, photo.shape[1] + 1)
        top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        crop = Image.fromarray(photo[top : top + h, left : left + w])
        crop = crop.resize((int(rng.integers(*sides, endpoint=True)), int(rng.integers(*sides, endpoint=True))))
        pixels = np.asarray(crop, dtype=np.int16) + rng.integers(-12, 13, (crop.height, crop.width, 3))
        path = root / f"c{i % CLASSES}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        files.append(path)
    return sorted(files)


def _decode_chunk(args: tuple[list[Path], int]) -> np.ndarray:
    files, size = args
    return np.stack([decode_image(file, size, 3) for file in files])


def throughput(files: list[Path], size: int) -> None:
    workers = decode_workers()
    rows = []

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        fn()
        rows.append((name, len(files) / (time.perf_counter() - start)))

    timed("threads, 1 worker", lambda: decode_images(files, size=size, channels=3, folder=files[0].parent,
                                                      workers=1))
    timed(f"threads, {workers} workers (prepare)",
          lambda: decode_images(files, size=size, channels=3, folder=files[0].parent, workers=workers))

    def processes() -> None:
        chunks = [(files[i : i + 64], size) for i in range(0, len(files), 64)]
        out = np.empty((len(files), 3, size, size), dtype=np.uint8)
        with ProcessPoolExecutor(workers) as pool:
            start = 0
            for part in pool.map(_decode_chunk, chunks):
                out[start : start + len(part)] = part
                start += len(part)

    timed(f"processes, {workers} workers", processes)
    base = rows[0][1]
    print(f"\ndecoding {len(files)} JPEGs (300-640 px sides) to {size} px, {workers} CPUs in this process's affinity")
    for name, rate in rows:
        print(f"  {name:34s} {rate:9.1f} images/s  {rate / base:5.2f}x")

    sample = files[: min(len(files), 1000)]

    def one_thread(draft: bool) -> float:
        start = time.perf_counter()
        for file in sample:
            with Image.open(file) as image:
                if draft:
                    image.draft("RGB", (size, size))
                ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BILINEAR)
        return len(sample) / (time.perf_counter() - start)

    full, reduced = one_thread(False), one_thread(True)
    print(f"one thread, {len(sample)} JPEGs: full decode {full:.1f} images/s, with Image.draft "
          f"{reduced:.1f} images/s ({reduced / full:.2f}x)")


def peak_rss(n: int, work: Path) -> None:
    folder = work / f"rss{n}"
    make_photos(folder, n, sides=(224, 224), seed=n)
    out = work / f"prepared{n}"
    params = compose(["~experiment", "data=imagefolder", f"data.path={folder}", "data.image_size=224",
                      "data.channels=3", "backbone.channels=3", f"paths.prepared={out}"], config_dir=REPO / "conf")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    stage = [sys.executable, "-m", "transferlab.stages.prepare", "--params", str(work / "params.yaml")]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *stage], cwd=work, env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{proc.stderr[-2000:]}")
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    peak = int(proc.stdout.split()[-1]) * 1024  # kilobytes on Linux
    goal = 2 * written + 2**30
    print(f"  {n:6d} images: prepared {written / 2**20:8.1f} MiB, peak RSS {peak / 2**20:8.1f} MiB "
          f"({peak / written:4.2f}x prepared; goal 2x + 1 GiB = {goal / 2**20:.0f} MiB), {seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10000, help="JPEGs for the throughput test")
    parser.add_argument("--size", type=int, default=224, help="stored size for the throughput test")
    parser.add_argument("--rss-sizes", type=int, nargs="*", default=[2000, 8000],
                        help="image counts for the peak-memory test (224 px)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_prepare-") as tmp:
        work = Path(tmp)
        if args.n:
            start = time.perf_counter()
            files = make_photos(work / "photos", args.n, sides=(300, 640))
            print(f"generated {len(files)} JPEGs in {time.perf_counter() - start:.1f} s")
            throughput(files, args.size)
        if args.rss_sizes:
            print("\npeak memory of the prepare stage, 224 px images stored at 224 px:")
            for n in args.rss_sizes:
                peak_rss(n, work)


if __name__ == "__main__":
    main()
