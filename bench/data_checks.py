"""Costs of the dataset checks added for issue 11, measured side by side in one run:

1. the dataset fingerprint (image size + 5 sampled 4 KiB blocks per image, annotations hashed
   during the open-time scan) against the open-time scan itself, against the old size-only
   fingerprint (one ``stat`` per image) and against hashing every image byte; with the files in
   the page cache (warm) and dropped from it first (cold: ``posix_fadvise(DONTNEED)``, local disk
   only -- a network file system adds its per-request latency to every block);
2. validating SA-1B RLEs before decoding (run lengths parsed and summed) against parsing the
   JSON and against pycocotools' decode, per image of 100 SA-1B-size masks.

    python bench/data_checks.py [--images 1000] [--masks 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from maskteacher.data import _io, open_dataset
from maskteacher.data.segmentation import check_rles, decode_rles, to_rle

HW = (1500, 2250)  # SA-1B's image size
_io.PROGRESS_MIN_ITEMS = 10**12  # the readers' progress bars would garble the output


def _smooth_image(rng: np.random.Generator) -> Image.Image:
    """A photo-like (smooth + some texture) image, so JPEG sizes are SA-1B-like (~0.5 MB)."""
    small = rng.integers(0, 256, (HW[0] // 50, HW[1] // 50, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((HW[1], HW[0]), Image.BICUBIC)
    noise = rng.integers(-12, 13, (*HW, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8))


def _blob_rles(rng: np.random.Generator, count: int) -> list[dict]:
    yy, xx = np.mgrid[0 : HW[0], 0 : HW[1]]
    rles = []
    for _ in range(count):
        cy, cx = rng.uniform(0, HW[0]), rng.uniform(0, HW[1])
        ry, rx = rng.uniform(20, 400, size=2)
        wobble = 1 + 0.2 * np.sin(xx / rng.uniform(5, 40)) * np.cos(yy / rng.uniform(5, 40))
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= wobble
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rles.append({"size": list(HW), "counts": rle["counts"].decode()})
    return rles


def _write_dataset(root: Path, images: int, rle: dict) -> list[Path]:
    rng = np.random.default_rng(0)
    base = [_smooth_image(rng) for _ in range(8)]
    files = []
    for k in range(images):
        path = root / f"sa_{k}.jpg"
        base[k % len(base)].rotate(k // len(base), fillcolor=(k % 256, 0, 0)).save(path, quality=90)
        doc = {"image": {"image_id": k}, "annotations": [{"id": 0, "segmentation": rle}]}
        (root / f"sa_{k}.json").write_text(json.dumps(doc))
        files += [path, root / f"sa_{k}.json"]
    for path in files:  # dirty pages cannot be dropped from the page cache
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    return files


def _drop_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed(fn: Callable[[], object], files: list[Path], cold: bool) -> float:
    if cold:
        _drop_cache(files)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _full_hash(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            hashlib.file_digest(f, "blake2b")


def bench_fingerprint(images: int, rle: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        files = _write_dataset(root, images, rle)
        jpegs = [p for p in files if p.suffix == ".jpg"]
        mb = sum(p.stat().st_size for p in jpegs) / images / 2**20
        print(
            f"{images} images of {HW[0]}x{HW[1]} ({mb:.2f} MB each) written in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        per10k = 10_000 / images
        for cold in (False, True):
            label = "cold" if cold else "warm"
            ds = open_dataset(root, "sa1b")  # warm the reader's imports
            scan = _timed(lambda: open_dataset(root, "sa1b"), files, cold)
            ds = open_dataset(root, "sa1b")
            fingerprint = _timed(ds.fingerprint_entries, files, cold)
            size_only = _timed(lambda: [p.stat().st_size for p in jpegs], files, cold)
            full = _timed(lambda: _full_hash(jpegs), files, cold)
            print(
                f"[{label}] per 10k images: open-time scan {scan * per10k:.1f} s, "
                f"fingerprint v2 {fingerprint * per10k:.1f} s "
                f"({fingerprint / scan:.2f}x the scan), size-only v1 {size_only * per10k:.2f} s, "
                f"hash every byte {full * per10k:.1f} s ({full / fingerprint:.1f}x v2)"
            )


def bench_rles(masks: int) -> None:
    rng = np.random.default_rng(1)
    rles = _blob_rles(rng, masks)
    doc = json.dumps({"annotations": [{"id": k, "segmentation": r} for k, r in enumerate(rles)]})
    wheres = ["x"] * masks
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        json.loads(doc)
    parse = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    for _ in range(reps):
        check_rles(rles, HW, wheres)
    check = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    for _ in range(3):
        decode_rles([to_rle(r, HW) for r in rles], HW)
    decode = (time.perf_counter() - t) / 3
    chars = sum(len(r["counts"]) for r in rles)
    print(
        f"per image of {masks} masks ({chars / masks:.0f} RLE characters each): JSON parse "
        f"{parse * 1e3:.2f} ms, RLE validation {check * 1e3:.2f} ms "
        f"({check / parse:.1f}x the parse), pycocotools decode {decode * 1e3:.1f} ms "
        f"(validation = {check / decode:.4f}x the decode)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--masks", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(2)
    bench_fingerprint(args.images, _blob_rles(rng, 1)[0])
    bench_rles(args.masks)


if __name__ == "__main__":
    main()
