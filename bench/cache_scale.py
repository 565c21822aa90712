"""The cache at SA-1B scale (issue 16): index size, open time and memory, worker memory over an
epoch, reads by position and by id, verify with 1 and 2 jobs, ``cache inspect``, the loader the
trainer should use, and the writer's cost over a shard -- with an extrapolation to 11 M images.

Two kinds of caches are built under ``--dir``:

* **data cache**: ``--data-images`` real records of ``--masks`` (100) int8 teacher masks of
  ``--low-res`` (256) squared plus 10 ground-truth masks (bench/cache_io.py's synthetic logits),
  written with ``ShardWriter`` in shards of 256, finalized. Verify, inspect, the loaders and the
  writer are measured on it.
* **index caches** at N = 1e4, 1e5, 1e6 (``--sizes``): shards are hard links to the files of one
  real 256-image shard of tiny records (8 masks of 16 x 16: the data would not fit otherwise),
  and the index and manifest are built by the library (``build_columns``, ``write_index``) for N
  distinct ids. Reads are real reads of real chunks; only the shards' own tables repeat the
  template's ids (so these caches are not for ``cache verify``).

Figures (one fresh child process per open measurement; RSS from /proc: psutil is not a
dependency, and /proc/self/status + smaps_rollup are what it would read):

  open_s / open_rss_mb    open_cache + one read by position + one lookup by id, in a new process
  worker_dirty_mb_per_1M  growth of Private_Dirty (copy-on-write copies + new allocations) of a
                          DataLoader worker over one shuffled epoch of read_raw, per 1 M images
  read_p50_ms index / id  reader[i] / reader[image_id], random, warm
  verify_ms_per_image     cache verify (checksums + decode) with --jobs 1 and --jobs 2
  inspect_s               `python -m maskteacher cache inspect` wall time (a new process)
  loader images/s         DataLoader(num_workers=2), shuffled, 100-mask records: "trainer
                          today" = workers decode (reader[i]) and build tensors, as
                          train/cache_targets.CacheTargets does; "fast path" = workers
                          read_raw(fields=...), the main process decode_many + tensors
  writer ms/image         ShardWriter.add for the first and last 32 images of a 256-image
                          shard, this writer and the format-1 writer (one zarr write per image)
                          side by side, median over --repeats shards
  verify cpu_ms/image     CPU of verify's process and workers (with the wall time and load
                          average: on shared cores the wall ratio shows the free cores)

    python bench/cache_scale.py            # table
    python bench/cache_scale.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cache_io import LogitSynth  # noqa: E402

from maskteacher.cache_format import (  # noqa: E402
    CacheHeader,
    CacheRecord,
    Codec,
    ShardWriter,
    StoreFlags,
    decode_many,
    finalize,
    init_cache,
    open_cache,
)
from maskteacher.cache_format.index import build_columns, write_index  # noqa: E402
from maskteacher.cache_format.jsonio import write_json_atomic  # noqa: E402
from maskteacher.cache_format.manifest import Manifest, load_manifest  # noqa: E402
from maskteacher.cache_format.storage import LocalSource  # noqa: E402

SA1B = 11_000_000
FIELDS = ("teacher_logits", "teacher_points", "teacher_iou", "gt_masks")


# --------------------------------------------------------------------------------------------
# Memory of this process (Linux /proc)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def private_dirty_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------------------------
# Building caches


def _record(i: int, logits: np.ndarray, gt: np.ndarray, image_size: int) -> CacheRecord:
    n = logits.shape[0]
    rng = np.random.default_rng(i)
    xy = rng.uniform(0, image_size, (n, 2)).astype(np.float32)
    return CacheRecord(
        image_id=f"img{i:07d}",
        split="train",
        orig_hw=np.array([1500, 2250]),
        input_hw=np.array([image_size * 2 // 3, image_size]),
        teacher_logits=logits,
        teacher_points=xy,
        teacher_iou=rng.uniform(0.8, 1.0, n).astype(np.float32),
        teacher_stability=rng.uniform(0.9, 1.0, n).astype(np.float32),
        teacher_boxes=np.concatenate([xy, xy + 50], axis=1),
        gt_masks=gt,
        source=f"sa_{i}.jpg",
    )


def _header(image_size: int) -> CacheHeader:
    return CacheHeader(
        teacher_type="synthetic",
        checkpoint_sha256="0" * 64,
        image_size=image_size,
        codec=Codec("int8"),
        store=StoreFlags(teacher=True, gt=True),
        fingerprints={"train": "sha256:bench"},
    )


class OldZarrWriter:
    """The format-1 zarr writer: zarr-python resize + write per image (zarr reads and rewrites
    the growing shard file each time)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def write(self, spec, start, rows) -> None:
        arr = self.inner._arrays[spec.name]
        arr.resize((start + rows.shape[0], *spec.row_shape))
        arr[start : start + rows.shape[0]] = rows
        self.inner._rows[spec.name] = start + rows.shape[0]

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def close(self, index) -> None:
        self.inner.close(index)  # no encoded chunks pending: metadata only


def _synthetic(args: argparse.Namespace) -> tuple[list[np.ndarray], np.ndarray]:
    synth = LogitSynth(args.low_res, pool=32, white=0.1, seed=0)
    pool = [synth.image(k, args.masks) for k in range(16)]
    gt = np.random.default_rng(0).uniform(size=(10, args.low_res, args.low_res)) < 0.2
    return pool, gt


def write_data_cache(root: str, args: argparse.Namespace) -> None:
    """The data cache: ``args.data_images`` records in shards of 256, finalized."""
    image_size = args.low_res * 4
    pool, gt = _synthetic(args)
    init_cache(root, _header(image_size))
    for s, start in enumerate(range(0, args.data_images, 256)):
        with ShardWriter(root, f"data-{s:05d}", split="train") as w:
            for i in range(start, min(start + 256, args.data_images)):
                w.add(_record(i, pool[i % len(pool)], gt, image_size))
    finalize(root)


def writer_timings(folder: str, args: argparse.Namespace) -> dict:
    """ShardWriter.add per image over 256-image shards, this writer and the format-1 writer
    side by side (image i goes to both in turn, so load from other processes hits both alike),
    ``args.repeats`` shards each: median over the repeats of the mean ms of the first and last
    32 images and of their ratio."""
    image_size = args.low_res * 4
    pool, gt = _synthetic(args)
    runs: dict[str, list[tuple[float, float]]] = {"new": [], "old": []}
    for r in range(args.repeats):
        writers = {}
        for kind in ("new", "old"):
            root = os.path.join(folder, f"writer-{kind}-{r}")
            init_cache(root, _header(image_size))
            writers[kind] = ShardWriter(root, "w-00000", split="train")
            if kind == "old":
                writers[kind]._backend = OldZarrWriter(writers[kind]._backend)
        times: dict[str, list[float]] = {"new": [], "old": []}
        for i in range(256):
            rec = _record(i, pool[i % len(pool)], gt, image_size)
            for kind, w in writers.items():
                t = time.perf_counter()
                w.add(rec)
                times[kind].append(time.perf_counter() - t)
        for kind, w in writers.items():
            w.close()
            shutil.rmtree(os.path.join(folder, f"writer-{kind}-{r}"))
            v = 1e3 * np.asarray(times[kind])
            runs[kind].append((float(v[:32].mean()), float(v[-32:].mean())))
    return {
        kind: {
            "first32_ms": float(np.median([a for a, _ in v])),
            "last32_ms": float(np.median([b for _, b in v])),
            "ratio_median": float(np.median([b / a for a, b in v])),
            "ratios": [b / a for a, b in v],
        }
        for kind, v in runs.items()
    }


def write_index_cache(root: str, n: int, template: str) -> None:
    """An index cache of ``n`` images whose shards are hard links to ``template``'s shard."""
    src = LocalSource(template)
    manifest = load_manifest(src)
    entry = manifest.shards[0]
    reader = open_cache(template)
    table = reader.shard_reader(0).table()
    per = len(table)
    shards, tables = [], []
    os.makedirs(os.path.join(root, "shards"))
    shutil.copy(os.path.join(template, "cache_header.json"), root)
    for k in range(-(-n // per)):
        name = f"t-{k:06d}"
        for folder, _dirs, files in os.walk(os.path.join(template, entry.path)):
            rel = os.path.relpath(folder, os.path.join(template, entry.path))
            dst = os.path.join(root, "shards", name + ".zarr", rel)
            os.makedirs(dst, exist_ok=True)
            for f in files:
                os.link(os.path.join(folder, f), os.path.join(dst, f))
        count = min(per, n - k * per)
        t = type(table)(**{**table.__dict__})
        t.image_id = [f"sa_{k * per + j}" for j in range(count)]
        for col in (
            "source",
            "orig_hw",
            "input_hw",
            "teacher_start",
            "teacher_count",
            "gt_start",
            "gt_count",
        ):
            setattr(t, col, getattr(table, col)[:count])
        tables.append(t)
        shards.append(
            type(entry)(
                f"shards/{name}.zarr",
                "train",
                "zarr",
                count,
                0,
                0,
                entry.bytes,
                sidecar=entry.sidecar,
            )
        )
    index = write_index(root, build_columns(tables))
    full = Manifest(manifest.header, shards, [], manifest.layout, index, manifest.quant)
    write_json_atomic(os.path.join(root, "manifest.json"), full.to_json())


def tiny_template(root: str) -> None:
    rng = np.random.default_rng(1)
    init_cache(root, _header(64))
    with ShardWriter(root, "tpl-00000", split="train") as w:
        for i in range(256):
            logits = rng.normal(0, 8, (8, 16, 16)).astype(np.float32)
            w.add(_record(i, logits, np.zeros((1, 16, 16), bool), 64))
    finalize(root)


# --------------------------------------------------------------------------------------------
# Child-process measurements


CHILD_OPEN = """
import json, sys, time
sys.path.insert(0, {bench!r})
from cache_scale import rss_mb
from maskteacher.cache_format import open_cache
r0 = rss_mb(); t = time.perf_counter()
reader = open_cache({root!r})
reader.read_raw(len(reader) // 2)
reader.index_of("sa_%d" % (len(reader) // 3))
print(json.dumps({{"open_s": time.perf_counter() - t, "open_rss_mb": rss_mb() - r0}}))
"""


def child_open(root: str) -> dict:
    code = CHILD_OPEN.format(bench=os.path.dirname(os.path.abspath(__file__)), root=root)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class EpochItems:
    """read_raw of every image; every 512th item also reports the worker's Private_Dirty."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        raw = self.reader.read_raw(i)
        mem = (os.getpid(), private_dirty_mb()) if i % 512 == 0 else None
        return raw.nbytes, mem


def worker_growth(root: str) -> float:
    """Largest Private_Dirty growth (MB) of a DataLoader worker over one shuffled epoch."""
    import torch
    from torch.utils.data import DataLoader

    reader = open_cache(root)
    loader = DataLoader(
        EpochItems(reader),
        batch_size=64,
        shuffle=True,
        num_workers=2,
        collate_fn=lambda b: b,
        generator=torch.Generator().manual_seed(0),
    )
    seen: dict[int, list[float]] = {}
    for batch in loader:
        for _nbytes, mem in batch:
            if mem is not None:
                seen.setdefault(mem[0], []).append(mem[1])
    return max(v[-1] - v[0] for v in seen.values())


def read_p50(root: str, reads: int) -> tuple[float, float]:
    """p50 of reader[i] and of reader[image_id] over two independent random draws (warm)."""
    reader = open_cache(root)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(reader), reads)
    ids = [reader.image_ids[int(i)] for i in rng.integers(0, len(reader), reads)]
    for i in picks[:50]:
        reader[int(i)]
    by_index, by_id = [], []
    for i, image_id in zip(picks, ids):
        t = time.perf_counter()
        reader[int(i)]
        by_index.append(time.perf_counter() - t)
        t = time.perf_counter()
        reader[image_id]
        by_id.append(time.perf_counter() - t)
    return 1e3 * float(np.median(by_index)), 1e3 * float(np.median(by_id))


# --------------------------------------------------------------------------------------------
# Loaders: the trainer's path today and the fast path


class TrainerToday:
    """As train/cache_targets.CacheTargets.targets: the worker decodes and builds tensors."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        import torch

        rec = self.reader[i]
        return {
            "gt": torch.from_numpy(np.ascontiguousarray(rec.gt_masks)),
            "logits": torch.from_numpy(rec.teacher_logits),
            "points": torch.from_numpy(rec.teacher_points),
            "iou": torch.from_numpy(rec.teacher_iou),
        }


class FastPath(TrainerToday):
    """The worker returns the compressed chunks of the fields the trainer needs."""

    def __getitem__(self, i: int):
        return self.reader.read_raw(i, fields=FIELDS)


def _to_tensors(rec):
    import torch

    return {
        "gt": torch.from_numpy(rec.gt_masks),
        "logits": torch.from_numpy(rec.teacher_logits),
        "points": torch.from_numpy(rec.teacher_points),
        "iou": torch.from_numpy(rec.teacher_iou),
    }


def loader_rate(root: str, dataset_cls, *, items: int, seconds: float) -> float:
    import torch
    from torch.utils.data import DataLoader

    reader = open_cache(root)
    loader = DataLoader(
        dataset_cls(reader),
        batch_size=8,
        shuffle=True,
        num_workers=2,
        collate_fn=lambda b: b,
        persistent_workers=True,
        prefetch_factor=4,
        generator=torch.Generator().manual_seed(0),
    )

    def batches():
        while True:
            yield from loader

    it = batches()
    next(it)
    count, start = 0, time.perf_counter()
    while count < items and time.perf_counter() - start < seconds:
        batch = next(it)
        if dataset_cls is FastPath:
            batch = [_to_tensors(r) for r in decode_many(batch, threads=2)]
        count += len(batch)
    rate = count / (time.perf_counter() - start)
    it.close()
    return rate


CHILD_VERIFY = """
import json, os, resource, time
from maskteacher.cache_format.verify import verify_cache
t = time.perf_counter()
report = verify_cache({root!r}, progress=False, jobs={jobs})
wall = time.perf_counter() - t
cpu = sum(
    u.ru_utime + u.ru_stime
    for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
)
print(json.dumps({{"s": wall, "cpu_s": cpu, "ok": report.ok, "load": os.getloadavg()[0]}}))
"""


def verify_run(root: str, jobs: int, images: int) -> dict:
    """verify_cache in a fresh process (as `cache verify` runs: no zarr-python threads, so the
    worker pool forks): wall ms and CPU ms (the process and its workers) per image, and the
    machine's 1-minute load average at the end."""
    code = CHILD_VERIFY.format(root=root, jobs=jobs)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"]
    return {
        "ms": 1e3 * result["s"] / images,
        "cpu_ms": 1e3 * result["cpu_s"] / images,
        "load": result["load"],
    }


def inspect_s(root: str) -> float:
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "maskteacher", "cache", "inspect", root],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - t


# --------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict:
    tmp = tempfile.mkdtemp(prefix="cache_scale_", dir=args.dir)
    out: dict = {"sizes": [], "settings": vars(args).copy()}
    try:
        template = os.path.join(tmp, "template")
        tiny_template(template)
        for n in args.sizes:
            root = os.path.join(tmp, f"n{n}")
            t = time.perf_counter()
            write_index_cache(root, n, template)
            row = {"images": n, "build_s": time.perf_counter() - t}
            index_dir = os.path.join(root, load_manifest(LocalSource(root)).index.path)
            row["index_mb"] = sum(f.stat().st_size for f in Path(index_dir).iterdir()) / 2**20
            row["manifest_kb"] = os.path.getsize(os.path.join(root, "manifest.json")) / 1024
            row.update(child_open(root))
            row["read_p50_ms_index"], row["read_p50_ms_id"] = read_p50(root, args.reads)
            row["worker_dirty_mb"] = worker_growth(root) if n <= args.epoch_max else None
            row["inspect_s"] = inspect_s(root)
            out["sizes"].append(row)
            print(f"# index cache {n}: {row}", file=sys.stderr)
            shutil.rmtree(root)
        out["writer"] = writer_timings(tmp, args)
        print(f"# writer: {out['writer']}", file=sys.stderr)
        data = os.path.join(tmp, "data")
        write_data_cache(data, args)
        out["verify"] = {1: [], 2: []}
        for _ in range(args.repeats):  # alternate
            for jobs in (1, 2):
                out["verify"][jobs].append(verify_run(data, jobs, args.data_images))
        out["verify_ms_per_image"] = {j: min(r["ms"] for r in v) for j, v in out["verify"].items()}
        out["data_inspect_s"] = min(inspect_s(data) for _ in range(3))
        rates: dict[str, float] = {"trainer_today": 0.0, "fast_path": 0.0}
        for _ in range(args.repeats):
            for name, cls in (("trainer_today", TrainerToday), ("fast_path", FastPath)):
                rates[name] = max(
                    rates[name],
                    loader_rate(data, cls, items=args.loader_items, seconds=args.loader_seconds),
                )
        out["loader_images_per_s"] = rates
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    out["extrapolation_11M"] = extrapolate(out)
    out["acceptance"] = acceptance(out)
    return out


def _at(out: dict, key: str, n: float) -> float | None:
    """``key`` at ``n`` images: measured if a row has exactly ``n``, else a straight line
    (least squares, fixed cost + cost per image) through the measured rows."""
    rows = [r for r in out["sizes"] if r.get(key) is not None]
    exact = [r[key] for r in rows if r["images"] == n]
    if exact:
        return exact[0]
    if len(rows) < 2:
        return None if not rows else rows[0][key] * n / rows[0]["images"]
    slope, intercept = np.polyfit([r["images"] for r in rows], [r[key] for r in rows], 1)
    return float(intercept + slope * n)


def _per_million(out: dict, key: str) -> float | None:
    if key == "worker_dirty_mb":  # small and noisy: scale the largest epoch, all per image
        rows = [r for r in out["sizes"] if r.get(key) is not None]
        big = max(rows, key=lambda r: r["images"]) if rows else None
        return None if big is None else max(big[key], 0.0) * 1e6 / big["images"]
    return _at(out, key, 1_000_000)


def extrapolate(out: dict) -> dict:
    v2 = out["verify_ms_per_image"].get(2)
    keys = ("index_mb", "manifest_kb", "open_s", "open_rss_mb")
    row = {k: _at(out, k, SA1B) for k in keys}
    per_million = _per_million(out, "worker_dirty_mb")
    row["worker_dirty_mb"] = None if per_million is None else per_million * SA1B / 1e6
    row["images"] = SA1B
    row["verify_hours_2_jobs"] = None if v2 is None else v2 * SA1B / 3.6e6
    return row


def acceptance(out: dict) -> list[dict]:
    w, v, r = out["writer"]["new"], out["verify_ms_per_image"], out["loader_images_per_s"]
    rows = [
        ("open time per 1M images (s)", _per_million(out, "open_s"), "<= 0.5"),
        ("open RSS per 1M images (MB)", _per_million(out, "open_rss_mb"), "<= 100"),
        (
            "worker Private_Dirty growth per epoch, per 1M images (MB)",
            _per_million(out, "worker_dirty_mb"),
            "<= 50",
        ),
        ("loader, 2 workers, fast path (images/s)", r["fast_path"], ">= 400"),
        (
            "loader fast path / trainer today (same run)",
            r["fast_path"] / r["trainer_today"],
            ">= 2",
        ),
        ("verify --jobs 1 / --jobs 2 time (same run)", v[1] / v[2], ">= 1.7"),
        ("cache inspect, 1000+ image cache (s)", out["data_inspect_s"], "<= 1.5"),
        ("writer: last 32 / first 32 of a shard (median of repeats)", w["ratio_median"], "<= 1.2"),
    ]
    result = []
    for name, value, target in rows:
        op, limit = target.split()
        met = (
            None
            if value is None
            else (value <= float(limit) if op == "<=" else value >= float(limit))
        )
        result.append({"target": name, "value": value, "wanted": target, "met": met})
    old = out["writer"]["old"]
    result.append(
        {
            "target": "format-1 writer: last 32 / first 32 (reference)",
            "value": old["ratio_median"],
            "wanted": "-",
            "met": None,
        }
    )
    return result


def print_table(out: dict) -> None:
    cols = (
        "images",
        "index_mb",
        "manifest_kb",
        "open_s",
        "open_rss_mb",
        "worker_dirty_mb",
        "read_p50_ms_index",
        "read_p50_ms_id",
        "inspect_s",
    )
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in out["sizes"]:
        print(
            "| " + " | ".join("-" if row.get(c) is None else f"{row[c]:.4g}" for c in cols) + " |"
        )
    e = out["extrapolation_11M"]
    keys = ("index_mb", "manifest_kb", "open_s", "open_rss_mb", "worker_dirty_mb")
    print(
        "| 11M (extrapolated) | "
        + " | ".join("-" if e[k] is None else f"{e[k]:.4g}" for k in keys)
        + " | | | |"
    )
    print(
        f"\nverify ms/image: {out['verify_ms_per_image']}; verify at 11M with 2 jobs: {e['verify_hours_2_jobs']:.2f} h"
    )
    print(f"loader images/s: {out['loader_images_per_s']}; writer: {out['writer']}\n")
    for a in out["acceptance"]:
        state = {True: "met", False: "NOT met", None: ""}[a["met"]]
        value = "-" if a["value"] is None else f"{a['value']:.3g}"
        print(f"- {a['target']}: {value} (wanted {a['wanted']}) {state}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--epoch-max", type=int, default=100_000, help="largest N with a worker epoch")
    p.add_argument("--data-images", type=int, default=1024)
    p.add_argument("--masks", type=int, default=100)
    p.add_argument("--low-res", type=int, default=256)
    p.add_argument("--reads", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--loader-items", type=int, default=1500)
    p.add_argument("--loader-seconds", type=float, default=12.0)
    p.add_argument("--dir", default=None, help="where the caches are built (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the caches")
    args = p.parse_args(argv)
    out = measure(args)
    print(json.dumps(out, indent=1) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_table(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
