"""Cache I/O benchmark: bytes, encode time, random read + decode, DataLoader throughput, floor.

Synthetic but realistic teacher logits: per mask, the signed distance d (pixels) to a noisy
star-shaped outline, mapped through ``20 * tanh(k * d / 20)`` with k uniform in [1.5, 5], plus
smooth noise (8x8 Gaussian field upsampled, std 1) and white noise (std ``--white``, 0.1);
object radii are log-uniform in [2 %, 35 %] of the side. ``--masks`` (100) masks of
``--low-res`` (256) squared per image, teacher data only (the issue's target figures).

For each backend x logit codec it measures, in one run on the same data:
  bytes_per_image    stored bytes (all shard files) / images
  encode_ms          ShardWriter.add per image (encode + compress + write)
  read_ms_p50/p95    reader[i] in random order, one process, warm page cache
  floor_ms           p50 of os.pread of exactly the same chunk bytes + the same decompression
  loader_images_per_s  DataLoader(num_workers=2) over read_raw, decode_many (2 threads) in the
                     main process (the mode the trainer uses); the table also shows workers
                     decoding and returning tensors
Reads and floors are interleaved across the four caches, DataLoader runs alternate (best of
--loader-repeats), so load from other processes affects every row alike.
  max_logit_err      max |decoded - float logit| where |logit| < 8 (writer statistics)

    python bench/cache_io.py            # table
    python bench/cache_io.py --json     # list of rows
    python bench/cache_io.py --sweep    # zstd level and masks-per-chunk measurements (docs)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from scipy import ndimage

from maskteacher.cache_format import (
    CacheHeader,
    Codec,
    ShardWriter,
    StoreFlags,
    finalize,
    init_cache,
    open_cache,
)
from maskteacher.cache_format.raw import decode_many
from maskteacher.cache_format.schema import DEFAULT_BACKEND, CacheRecord

BACKENDS = ("zarr", "hdf5")
CODECS = ("int8", "fp16")


# --------------------------------------------------------------------------------------------
# Synthetic logits


class LogitSynth:
    """Pools of shapes (signed distances) and smooth noise fields; images mix them."""

    def __init__(self, low_res: int, *, pool: int, white: float, seed: int) -> None:
        self.low_res = low_res
        self.white = white
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:low_res, 0:low_res].astype(np.float32)
        dists = []
        for _ in range(pool):
            cx, cy = rng.uniform(0.1, 0.9, 2) * low_res
            r0 = np.exp(rng.uniform(np.log(0.02), np.log(0.35))) * low_res
            ang = np.arctan2(yy - cy, xx - cx)
            wobble = sum(
                rng.uniform(0, 0.25 / h) * np.cos(h * ang + rng.uniform(0, 2 * np.pi))
                for h in range(1, 6)
            )
            inside = np.hypot(yy - cy, xx - cx) < r0 * (1 + wobble)
            d = ndimage.distance_transform_edt(inside) - ndimage.distance_transform_edt(~inside)
            dists.append(d.astype(np.float32))
        self.dists = np.stack(dists)
        self.smooth = np.stack(
            [
                ndimage.zoom(rng.normal(0, 1.0, (8, 8)), low_res / 8, order=3).astype(np.float32)
                for _ in range(pool)
            ]
        )

    def image(self, seed: int, masks: int) -> np.ndarray:
        """(masks, L, L) float32 logits for one image."""
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, len(self.dists), masks)
        k = rng.uniform(1.5, 5.0, masks).astype(np.float32)[:, None, None]
        d = self.dists[pick]
        flips = rng.integers(0, 2, (masks, 2)).astype(bool)
        d = np.stack([di[::-1] if fy else di for di, fy in zip(d, flips[:, 0])])
        d = np.stack([di[:, ::-1] if fx else di for di, fx in zip(d, flips[:, 1])])
        x = 20.0 * np.tanh(k * d / 20.0) + self.smooth[rng.integers(0, len(self.smooth), masks)]
        x += rng.normal(0, self.white, x.shape).astype(np.float32)
        return x.astype(np.float32)


def make_record(i: int, logits: np.ndarray, image_size: int) -> CacheRecord:
    n = logits.shape[0]
    rng = np.random.default_rng(10_000 + i)
    xy = rng.uniform(0, image_size, (n, 2)).astype(np.float32)
    return CacheRecord(
        image_id=f"img{i:05d}",
        split="train",
        orig_hw=np.array([1500, 2250]),
        input_hw=np.array([image_size * 2 // 3, image_size]),
        teacher_logits=logits,
        teacher_points=xy,
        teacher_iou=rng.uniform(0.8, 1.0, n).astype(np.float32),
        teacher_stability=rng.uniform(0.9, 1.0, n).astype(np.float32),
        teacher_boxes=np.concatenate([xy, xy + 50], axis=1),
        gt_masks=np.zeros((0, logits.shape[1], logits.shape[2]), bool),
    )


# --------------------------------------------------------------------------------------------
# Measurements


def floor_plan(reader, i: int) -> list[tuple[str, int, int, object, np.ndarray]]:
    """(file, offset, nbytes, codec, output view) for every chunk the reader fetches for image i.

    The output views cover one preallocated array per image: the floor materialises the whole
    decoded image like any reader must (decoding every chunk into one small reused buffer would
    stay in cache and undercount), but pays no allocation, checksum or record building.
    """
    shard, rows = reader.locate(i)
    plan = []
    for spec, _count, locs in shard.plan(rows):
        out = np.empty((len(locs) * spec.chunk_rows, *spec.row_shape), np.dtype(spec.dtype))
        for j, loc in enumerate(locs):
            view = out[j * spec.chunk_rows : (j + 1) * spec.chunk_rows].reshape(-1).view(np.uint8)
            plan.append(
                (
                    os.path.join(reader.source.root, loc.file),
                    loc.offset,
                    loc.nbytes,
                    spec.codec,
                    view,
                )
            )
    return plan


def run_floor(plan, fds: dict[str, int]) -> None:
    """os.pread of the same bytes + the same decompression into the image's output array."""
    import numcodecs

    for path, offset, nbytes, codec, out in plan:
        fd = fds.get(path)
        if fd is None:
            fd = fds[path] = os.open(path, os.O_RDONLY)
        body = np.frombuffer(os.pread(fd, nbytes, offset), np.uint8)[:-4]  # minus the checksum
        if codec.compressor == "zstd":
            numcodecs.Zstd().decode(body, out=out)
        elif codec.compressor == "blosc-zstd-shuffle":
            numcodecs.Blosc().decode(body, out=out)
        else:
            numcodecs.Shuffle(elementsize=codec.itemsize).decode(
                numcodecs.Zstd().decode(body), out=out
            )


class _Items:
    """Dataset over a cache: raw records (decoded by the consumer) or decoded tensors."""

    def __init__(self, reader, decode_in_worker: bool) -> None:
        self.reader = reader
        self.decode_in_worker = decode_in_worker

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        import torch

        if not self.decode_in_worker:
            return self.reader.read_raw(i)
        rec = self.reader[i]
        return {
            "logits": torch.from_numpy(rec.teacher_logits),
            "points": torch.from_numpy(rec.teacher_points),
            "iou": torch.from_numpy(rec.teacher_iou),
            "boxes": torch.from_numpy(rec.teacher_boxes),
        }


def _collate_list(batch):
    return batch


def loader_throughput(
    reader, *, decode_in_worker: bool, items: int, seconds: float, batch_size: int = 8
) -> float:
    """Images/s through DataLoader(num_workers=2) after warm-up, for ``items`` images or
    ``seconds``, whichever comes first. Raw mode decodes in the main process (2 threads)."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _Items(reader, decode_in_worker),
        batch_size=batch_size,
        shuffle=True,
        num_workers=2,
        collate_fn=_collate_list,
        persistent_workers=True,
        prefetch_factor=4,
        generator=torch.Generator().manual_seed(0),
    )

    def batches():
        while True:
            yield from loader

    it = batches()
    next(it)  # workers started and warm
    count, start = 0, time.perf_counter()
    while count < items and time.perf_counter() - start < seconds:
        batch = next(it)
        if not decode_in_worker:
            decode_many(batch, threads=2)
        count += len(batch)
    rate = count / (time.perf_counter() - start)
    it.close()  # ends the persistent workers with the iterator
    return rate


def bench(args: argparse.Namespace) -> list[dict]:
    image_size = args.low_res * 4
    t0 = time.perf_counter()
    synth = LogitSynth(args.low_res, pool=args.pool, white=args.white, seed=args.seed)
    print(f"# synthetic pool ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    combos = [(b, c) for b in args.backends for c in args.codecs]
    tmp = tempfile.mkdtemp(prefix="cache_io_", dir=args.dir)
    writers, encode_s, roots = {}, dict.fromkeys(combos, 0.0), {}
    for b, c in combos:
        roots[(b, c)] = root = os.path.join(tmp, f"{b}-{c}")
        header = CacheHeader(
            teacher_type="synthetic",
            checkpoint_sha256="0" * 64,
            image_size=image_size,
            params={"masks_per_image": args.masks},
            codec=Codec(c, clip=args.clip),
            store=StoreFlags(teacher=True, gt=False),
            backend=b,
        )
        init_cache(root, header)
        writers[(b, c)] = ShardWriter(root, "bench-00000", split="train")
    band_fraction = []
    for i in range(args.images):
        logits = synth.image(args.seed * 7919 + i, args.masks)
        band_fraction.append(float(np.mean(np.abs(logits) < args.clip)))
        rec = make_record(i, logits, image_size)
        for key, w in writers.items():  # side by side: every cache gets the image in turn
            t = time.perf_counter()
            w.add(rec)
            encode_s[key] += time.perf_counter() - t
    for w in writers.values():
        w.close()
    print(
        f"# wrote {args.images} images x {len(combos)} caches in {time.perf_counter() - t0:.1f} s; "
        f"pixels with |logit| < clip: {100 * np.mean(band_fraction):.1f} %",
        file=sys.stderr,
    )
    manifests = {k: finalize(roots[k]) for k in combos}
    readers = {k: open_cache(roots[k]) for k in combos}
    plans = {k: [floor_plan(r, i) for i in range(len(r))] for k, r in readers.items()}
    fds: dict[str, int] = {}
    for k, r in readers.items():  # warm: page cache, shard indexes, chunk tables
        for i in range(len(r)):
            r[i]
            run_floor(plans[k][i], fds)
    rng = np.random.default_rng(args.seed)
    times = {k: [] for k in combos}
    floor = {k: [] for k in combos}
    for _ in range(args.reads):  # interleaved, so other load on the machine hits all rows alike
        for k, r in readers.items():
            i = int(rng.integers(0, len(r)))
            t = time.perf_counter()
            r[i]
            times[k].append(time.perf_counter() - t)
            t = time.perf_counter()
            run_floor(plans[k][i], fds)
            floor[k].append(time.perf_counter() - t)
    for fd in fds.values():
        os.close(fd)
    print(f"# random reads done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    raw_rate = dict.fromkeys(combos, 0.0)
    dec_rate = dict.fromkeys(combos, 0.0)
    for _ in range(args.loader_repeats):  # best of alternating repeats
        for k, r in readers.items():
            opts = {"items": args.loader_items, "seconds": args.loader_seconds}
            raw_rate[k] = max(raw_rate[k], loader_throughput(r, decode_in_worker=False, **opts))
            dec_rate[k] = max(dec_rate[k], loader_throughput(r, decode_in_worker=True, **opts))
    print(f"# loaders done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    rows = []
    for b, c in combos:
        k = (b, c)
        n = len(readers[k])
        rows.append(
            {
                "backend": b,
                "codec": c,
                "default": b == DEFAULT_BACKEND and c == "int8",
                "bytes_per_image": sum(s.bytes for s in manifests[k].shards) / n,
                "encode_ms": 1e3 * encode_s[k] / n,
                "read_ms_p50": 1e3 * float(np.percentile(times[k], 50)),
                "read_ms_p95": 1e3 * float(np.percentile(times[k], 95)),
                "floor_ms": 1e3 * float(np.percentile(floor[k], 50)),
                "loader_images_per_s": raw_rate[k],
                "max_logit_err": manifests[k].quant["max_err_band"],
                "_loader_decoded_in_workers": dec_rate[k],
            }
        )
        readers[k].close()
    if not args.keep:
        shutil.rmtree(tmp)
    return rows


def layout_sweep(args: argparse.Namespace) -> None:
    """In-memory measurements behind the layout choices: zstd level and masks per chunk."""
    import numcodecs

    synth = LogitSynth(args.low_res, pool=args.pool, white=args.white, seed=args.seed)
    images = [
        np.rint(np.clip(synth.image(i, args.masks), -12, 12) * (127 / 12)).astype(np.int8)
        for i in range(4)
    ]

    def p50(fn, reps=15):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return 1e3 * float(np.median(ts))

    print("zstd level: KB/image, encode ms, decode ms (whole image as one frame)")
    for level in (1, 3, 6, 9):
        z = numcodecs.Zstd(level=level)
        frames = [z.encode(q) for q in images]
        enc = np.mean([p50(lambda q=q, z=z: z.encode(q), 3) for q in images])
        dec = np.mean([p50(lambda f=f, z=z: z.decode(f)) for f in frames])
        print(
            f"  level {level}: {np.mean([len(f) for f in frames]) / 1e3:6.1f} KB  enc {enc:6.1f}  dec {dec:5.2f}"
        )
    print("masks per chunk (image-aligned, zero-padded), level 6: KB/image, decode ms")
    z = numcodecs.Zstd(level=6)
    n = args.masks
    for rows in (1, 8, 16, 32, 64, 128, n):
        sizes, decs = [], []
        for q in images:
            padded = np.zeros((-(-n // rows) * rows, *q.shape[1:]), np.int8)
            padded[:n] = q
            chunks = [z.encode(padded[s : s + rows]) for s in range(0, n, rows)]
            sizes.append(sum(len(c) for c in chunks))
            decs.append(p50(lambda chunks=chunks: [z.decode(c) for c in chunks]))
        label = (
            "1 (one chunk per mask)" if rows == 1 else ("whole image" if rows == n else str(rows))
        )
        print(f"  {label:>22}: {np.mean(sizes) / 1e3:6.1f} KB  dec {np.mean(decs):5.2f}")


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'backend':8} {'codec':5} {'dflt':4} {'KB/img':>8} {'enc ms':>7} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'floor ms':>8} {'p50/floor':>9} {'loader/s':>9} {'(workers decode)':>16} {'max err':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['backend']:8} {r['codec']:5} {'*' if r['default'] else '':4} {r['bytes_per_image'] / 1e3:8.1f} "
            f"{r['encode_ms']:7.1f} {r['read_ms_p50']:7.2f} {r['read_ms_p95']:7.2f} {r['floor_ms']:8.2f} "
            f"{r['read_ms_p50'] / r['floor_ms']:9.2f} {r['loader_images_per_s']:9.0f} "
            f"{r['_loader_decoded_in_workers']:16.0f} {r['max_logit_err']:8.4f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=32, help="images per cache")
    p.add_argument("--masks", type=int, default=100, help="teacher masks per image")
    p.add_argument("--low-res", type=int, default=256, help="L (image_size = 4 L)")
    p.add_argument("--clip", type=float, default=12.0, help="int8 codec clip C")
    p.add_argument(
        "--white", type=float, default=0.1, help="white-noise std of the synthetic logits"
    )
    p.add_argument("--pool", type=int, default=160, help="distinct synthetic shapes")
    p.add_argument("--reads", type=int, default=200, help="timed random reads per cache")
    p.add_argument(
        "--loader-items", type=int, default=160, help="images per DataLoader measurement"
    )
    p.add_argument(
        "--loader-seconds", type=float, default=3.0, help="time cap per DataLoader measurement"
    )
    p.add_argument(
        "--loader-repeats", type=int, default=2, help="alternating repeats (best is kept)"
    )
    p.add_argument(
        "--sweep", action="store_true", help="print the zstd-level / chunk-size sweep instead"
    )
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--codecs", nargs="+", choices=CODECS, default=list(CODECS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dir", default=None, help="folder for the temporary caches (default: system temp)"
    )
    p.add_argument("--keep", action="store_true", help="keep the caches")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.sweep:
        layout_sweep(args)
        return 0
    rows = bench(args)
    if args.json:
        print(
            json.dumps(
                [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], indent=1
            )
        )
    else:
        print_table(rows)
        print(
            f"\n({time.perf_counter() - start:.0f} s; one machine, numbers shift with other load)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
