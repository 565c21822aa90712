"""``maskteacher cache inspect|verify|merge|view|upgrade|repair``: share and check teacher caches."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np

from maskteacher.errors import UserError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cache", help="inspect, verify, merge, view, upgrade and repair teacher caches"
    )
    sub = parser.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    for add in (_add_inspect, _add_verify, _add_merge, _add_view, _add_upgrade, _add_repair):
        add(sub)


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect", help="summarise a cache (images, masks, bytes, codec, teacher, failures)"
    )
    p.add_argument("path", help="cache folder or fsspec URL")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_inspect)


def _add_verify(sub: Any) -> None:
    p = sub.add_parser(
        "verify", help="recompute checksums and decode everything; exit 1 if anything is bad"
    )
    p.add_argument("path", help="cache folder or fsspec URL")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="processes checking shards in parallel (default: the CPU cores available)",
    )
    p.add_argument(
        "--checksums-only",
        action="store_true",
        help="only the sha256 pass over every file (skip decoding every image)",
    )
    p.set_defaults(func=run_verify)


def _add_upgrade(sub: Any) -> None:
    p = sub.add_parser(
        "upgrade", help="convert a format-1 cache to the current format in place (shards kept)"
    )
    p.add_argument("path", help="local cache folder")
    p.add_argument(
        "--jobs", type=int, default=None, metavar="N", help="processes for the checksum pass"
    )
    p.set_defaults(func=run_upgrade)


def _add_repair(sub: Any) -> None:
    p = sub.add_parser(
        "repair",
        help="keep one copy of images stored in two shards (two precompute runs at once), finalize",
    )
    p.add_argument("path", help="local cache folder")
    p.set_defaults(func=run_repair)


def _add_merge(sub: Any) -> None:
    p = sub.add_parser("merge", help="combine caches (e.g. one per worker) into OUT")
    p.add_argument("out", help="output cache folder (new, or an existing compatible cache)")
    p.add_argument("paths", nargs="+", help="input cache folders")
    p.add_argument(
        "--copy", action="store_true", help="copy shard files instead of hard-linking them"
    )
    p.set_defaults(func=run_merge)


def _add_view(sub: Any) -> None:
    p = sub.add_parser(
        "view", help="draw one image with its teacher masks and ground-truth outlines"
    )
    p.add_argument("path", help="cache folder or fsspec URL")
    p.add_argument("image_id", help="image id as stored in the cache")
    p.add_argument("--out", required=True, help="PNG file to write (never an input)")
    p.add_argument(
        "--split", default=None, help="split holding the image (needed if the id is in both)"
    )
    p.add_argument(
        "--image",
        default=None,
        help="the image file (default: the source path recorded in the cache)",
    )
    p.set_defaults(func=run_view)


def run_inspect(args: argparse.Namespace) -> int:
    from maskteacher.cache_format.summary import inspect_cache

    info = inspect_cache(args.path)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(format_inspect(info))
    return 0


def format_inspect(info: dict[str, Any]) -> str:
    def spread(s: dict[str, Any]) -> str:
        return (
            "-" if s["min"] is None else f"min {s['min']}, median {s['median']:g}, max {s['max']}"
        )

    q = info["quantisation"]
    codec = info["codec"]
    lines = [
        f"cache       {info['path']}",
        f"format      version {info['format_version']}, backend {info['backend']}",
        f"teacher     {info['teacher']['type']} (checkpoint sha256 {info['teacher']['checkpoint_sha256']})",
        f"image_size  {info['image_size']}",
        f"codec       {codec['name']}, clip {codec['clip']:g}, zstd level {codec['zstd_level']}",
        "store       " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["store"].items()),
        f"images      {info['images']} in {info['shards']} shards ("
        + ", ".join(f"{k}: {v}" for k, v in sorted(info["splits"].items()))
        + ")",
        f"masks/image {spread(info['masks_per_image'])}",
        f"gt/image    {spread(info['gt_masks_per_image'])}",
        f"bytes       {info['bytes']} total"
        + (
            f", {info['bytes_per_image'] / 1e3:.1f} KB per image" if info["bytes_per_image"] else ""
        ),
        "embedding   "
        + (
            "-"
            if info["embedding_bytes_per_image"] is None
            else f"fp16, {info['embedding_bytes_per_image'] / 1e3:.1f} KB per image before compression"
        ),
        "decoder     "
        + (
            "-"
            if info["teacher_decoder"] is None
            else f"{info['teacher_decoder']['path']}, {info['teacher_decoder']['arrays']} arrays, "
            f"{info['teacher_decoder']['bytes'] / 1e6:.2f} MB (sha256 {info['teacher_decoder']['sha256'][:16]}...)"
        ),
        "quantised   "
        + (
            "-"
            if q["max_err_inside_8"] is None
            else f"max clipped fraction {q['clipped_fraction_max']:.4f}, max error inside |logit|<8 {q['max_err_inside_8']:.4f}"
        ),
        "params      " + json.dumps(info["params"], sort_keys=True),
        f"failed      {len(info['failed_images'])} images",
    ]
    lines += [f"  {f['split']}/{f['image_id']}: {f['reason']}" for f in info["failed_images"]]
    return "\n".join(lines)


def run_verify(args: argparse.Namespace) -> int:
    from maskteacher.cache_format.verify import verify_cache

    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    report = verify_cache(
        args.path,
        progress=not args.quiet and not args.json,
        jobs=args.jobs,
        checksums_only=args.checksums_only,
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        for problem in report.problems:
            print(f"BAD {problem}")
        state = "OK" if report.ok else f"{len(report.problems)} problem(s)"
        decoded = f"{report.images_ok}/{report.images} images decoded, " if report.decoded else ""
        print(f"{state}: {decoded}{report.files} files in {report.shards} shards checked")
    return 0 if report.ok else 1


def run_upgrade(args: argparse.Namespace) -> int:
    from maskteacher.cache_format.upgrade import upgrade_cache

    manifest, converted = upgrade_cache(args.path, jobs=args.jobs, progress=True)
    if converted:
        print(
            f"upgraded {args.path} to format {manifest.version}: {manifest.images} images in {len(manifest.shards)} shards"
        )
    else:
        print(f"{args.path} is already format {manifest.version}: nothing to do")
    return 0


def run_repair(args: argparse.Namespace) -> int:
    from maskteacher.cache_format.repair import repair_cache

    report = repair_cache(args.path)
    for path in report.shards_deleted:
        print(f"deleted {path} (all its images are in earlier shards)")
    for path in report.shards_rewritten:
        print(f"wrote {path} without the images earlier shards hold")
    images = report.manifest.images if report.manifest else 0
    print(
        f"repaired {args.path}: {report.copies_dropped} duplicate copies dropped; {images} images in the manifest"
    )
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from maskteacher.cache_format.merge import merge_caches

    manifest = merge_caches(args.out, args.paths, link=not args.copy)
    print(
        f"merged {len(args.paths)} cache(s) into {args.out}: {manifest.images} images in {len(manifest.shards)} shards"
    )
    return 0


# --------------------------------------------------------------------------------------------
# view


def run_view(args: argparse.Namespace) -> int:
    from maskteacher.cache_format import logits_to_float, open_cache
    from maskteacher.viz import draw_masks, save_png

    reader = open_cache(args.path, split=args.split)
    rec = reader[reader.index_of(args.image_id, args.split)]
    header = reader.header
    image_path = args.image or _source_path(header, rec)
    _refuse_overwriting_inputs(args.out, args.path, image_path, header.dataset_roots)
    image = _load_image(image_path, rec)
    size, input_hw, orig_hw = header.image_size, tuple(rec.input_hw), tuple(rec.orig_hw)
    teacher = (
        lowres_to_original(
            logits_to_float(rec.teacher_logits, header.codec), size, input_hw, orig_hw
        )
        > 0
    )
    gt = lowres_to_original(rec.gt_masks.astype(np.float32), size, input_hw, orig_hw) > 0.5
    save_png(args.out, draw_masks(image, teacher, outlines=gt))
    print(f"wrote {args.out}: {rec.num_masks} teacher masks, {rec.num_gt} ground-truth outlines")
    return 0


def _refuse_overwriting_inputs(out: str, cache: str, image: str, roots: dict[str, str]) -> None:
    """--out must not be the image read, nor lie inside the cache or a dataset folder."""
    from maskteacher.cache_format.paths import inside

    if os.path.exists(out) and os.path.exists(image) and os.path.samefile(out, image):
        raise UserError(f"--out {out} is the image being drawn; choose another file")
    inputs = [("the cache", cache)] if "://" not in cache else []
    inputs += [(f"the {split} dataset folder", root) for split, root in sorted(roots.items())]
    for what, folder in inputs:
        if inside(os.path.dirname(os.path.abspath(out)) or ".", folder):
            raise UserError(
                f"--out {out} lies inside {what} ({folder}); write the picture elsewhere"
            )


def _source_path(header: Any, rec: Any) -> str:
    root = header.dataset_roots.get(rec.split)
    if rec.source is None or root is None:
        raise UserError(f"the cache records no image file for {rec.image_id!r}; pass --image FILE")
    return os.path.join(root, rec.source)


def _load_image(path: str, rec: Any) -> np.ndarray:
    from maskteacher.data import read_image  # the readers' decoding: stored grid, 16-bit scaled

    if not os.path.isfile(path):
        raise UserError(
            f"cannot find the image for {rec.image_id!r}: {path} does not exist; pass --image FILE"
        )
    image = read_image(path)
    if image.shape[:2] != tuple(rec.orig_hw):
        raise UserError(
            f"image {path} is {image.shape[0]}x{image.shape[1]} (HxW) but the cache recorded "
            f"{rec.orig_hw[0]}x{rec.orig_hw[1]} for {rec.image_id!r}: wrong --image?"
        )
    return image


def lowres_to_original(
    masks: np.ndarray,
    image_size: int,
    input_hw: tuple[int, int],
    orig_hw: tuple[int, int],
    *,
    batch: int = 16,
) -> np.ndarray:
    """(N, L, L) float low-res frame -> (N, H, W) float original frame.

    segment-anything's ``postprocess_masks``: bilinear up to image_size square, crop the
    unpadded input (h, w), bilinear to the original (H, W); done in batches to bound memory.
    """
    import torch
    import torch.nn.functional as F

    n = masks.shape[0]
    out = np.empty((n, int(orig_hw[0]), int(orig_hw[1])), np.float32)
    for s in range(0, n, batch):
        x = torch.from_numpy(np.ascontiguousarray(masks[s : s + batch], np.float32))[:, None]
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        x = x[..., : int(input_hw[0]), : int(input_hw[1])]
        x = F.interpolate(
            x, size=(int(orig_hw[0]), int(orig_hw[1])), mode="bilinear", align_corners=False
        )
        out[s : s + batch] = x[:, 0].numpy()
    return out
