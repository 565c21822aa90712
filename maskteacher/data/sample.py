"""Synthetic sample datasets: textured backgrounds with overlapping textured shapes and exact
ground-truth masks, written in any of the three reader formats.

:func:`generate_sample` builds the images and masks in memory (deterministic for a seed; image
``i`` depends only on ``(seed, i)``), :func:`make_sample` writes them. Every shape is a polygon
(ellipses are 40-gons) rasterised with pycocotools, so a COCO polygon annotation of an unoccluded
shape decodes to exactly the same mask. Each object's ground truth is its *visible* region after
the shapes drawn above it; an object left with fewer than ``MIN_VISIBLE_AREA`` visible pixels is
removed from the picture before painting (so no unlabelled slivers remain).

``style`` picks the look (:data:`~maskteacher.data.sample_styles.SAMPLE_STYLES`: ``shapes``, the
default, or ``shifted``, another domain for the same task). ``unlabelled`` leaves a fixed
fraction of each image's objects out of the written annotations, as in partly annotated real
data: ``round(unlabelled * n)`` of an image's ``n`` objects (halves round up), chosen at random
from ``(seed, index)`` alone, so the pictures are the same as with full annotations.

Layouts written:
- folder: ``OUT/image/sample_0000.png|jpg`` (even indices PNG, odd JPEG) + ``OUT/mask/<stem>/<k>.png``;
- sa1b: ``OUT/sa_<i+1>.jpg`` + ``OUT/sa_<i+1>.json`` (SA-1B fields, compressed-RLE strings);
- coco: ``OUT/annotations/instances.json`` + ``OUT/images/<id:012d>.jpg``. Unoccluded objects are
  polygons; occluded ones alternate between compressed and uncompressed RLE (iscrowd 0). Image
  0 also gets one ``iscrowd: 1`` annotation (uncompressed RLE, the union of all its objects),
  which readers skip unless ``include_crowd``.
JPEG (quality 95, no chroma subsampling) is lossy for the pixels only; masks are exact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image
from scipy import ndimage

from maskteacher.data.sample_styles import (
    DEFAULT_STYLE,
    SAMPLE_STYLES,
    SampleStyle,
    background,
    shape_polygon,
    texture,
)
from maskteacher.data.segmentation import decode_rles
from maskteacher.errors import UserError

MIN_VISIBLE_AREA = 12
JPEG_QUALITY = 95
SHAPE_KINDS = SAMPLE_STYLES[DEFAULT_STYLE].shapes


@dataclass
class SyntheticObject:
    """One shape: ``polygon`` flat [x1, y1, ...] in pixel coordinates (clipped to the image),
    ``visible`` (H, W) bool ground truth, ``occluded`` whether shapes above hide part of it."""

    kind: str
    polygon: list[float]
    visible: np.ndarray
    occluded: bool
    labelled: bool = True


@dataclass
class SyntheticImage:
    """Image ``index`` of a sample set: (H, W, 3) uint8 RGB and its objects bottom to top."""

    index: int
    image: np.ndarray
    objects: list[SyntheticObject]

    @property
    def masks(self) -> np.ndarray:
        """(M, H, W) bool visible masks, in drawing order (bottom first)."""
        h, w = self.image.shape[:2]
        if not self.objects:
            return np.zeros((0, h, w), dtype=bool)
        return np.stack([obj.visible for obj in self.objects])

    @property
    def annotated(self) -> list[SyntheticObject]:
        """The objects the written annotations hold (all but the ``unlabelled`` ones)."""
        return [obj for obj in self.objects if obj.labelled]


# ----------------------------------------------------------------------------- generation


def rasterize_polygon(polygon: list[float], hw: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of one flat polygon, rasterised by pycocotools (as COCO readers do)."""
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], hw[0], hw[1]))
    return decode_rles([rle], hw)[0]


def _visible_masks(shapes: list[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each shape, bottom to top (later shapes cover earlier ones)."""
    covered = np.zeros_like(shapes[0]) if shapes else None
    visible: list[np.ndarray] = [np.empty(0)] * len(shapes)
    for k in range(len(shapes) - 1, -1, -1):
        visible[k] = shapes[k] & ~covered
        covered |= shapes[k]
    return visible


def _unlabel(objects: list[SyntheticObject], fraction: float, seed: int, index: int) -> None:
    """Mark round(fraction * n) of the objects unlabelled (halves up), drawn from (seed, index)."""
    count = int(np.floor(fraction * len(objects) + 0.5))
    if count == 0:
        return
    rng = np.random.default_rng([seed, index, 1])
    for k in rng.choice(len(objects), size=count, replace=False):
        objects[int(k)].labelled = False


def _generate_one(
    seed: int, index: int, size_range: tuple[int, int], style: SampleStyle
) -> SyntheticImage:
    rng = np.random.default_rng([seed, index])
    hw = (
        int(rng.integers(size_range[0], size_range[1] + 1)),
        int(rng.integers(size_range[0], size_range[1] + 1)),
    )
    count = int(rng.integers(3, 10))
    kinds = [style.shapes[int(rng.integers(0, len(style.shapes)))] for _ in range(count)]
    polygons = [shape_polygon(rng, kind, hw) for kind in kinds]
    textures = [texture(rng, hw, style) for _ in range(count)]
    shapes = [rasterize_polygon(poly, hw) for poly in polygons]
    keep = list(range(count))
    while True:  # drop shapes that end up (almost) hidden; removing one only uncovers others
        visible = _visible_masks([shapes[k] for k in keep])
        small = [k for k, vis in zip(keep, visible) if vis.sum() < MIN_VISIBLE_AREA]
        if not small:
            break
        keep = [k for k in keep if k not in small]
    image = background(rng, hw)
    objects = []
    for k, vis in zip(keep, visible):
        image[shapes[k]] = textures[k][shapes[k]]
        objects.append(SyntheticObject(kinds[k], polygons[k], vis, bool((shapes[k] & ~vis).any())))
    return SyntheticImage(index, image.clip(0, 255).round().astype(np.uint8), objects)


def generate_sample(
    images: int,
    seed: int = 0,
    *,
    size_range: tuple[int, int] = (96, 200),
    style: str = DEFAULT_STYLE,
    unlabelled: float = 0.0,
) -> list[SyntheticImage]:
    """``images`` synthetic images with exact masks; sides drawn uniformly from ``size_range``;
    ``style`` a :data:`SAMPLE_STYLES` name; ``unlabelled`` the fraction of objects left out of
    the annotations (module docstring)."""
    if images < 1:
        raise UserError(f"images must be >= 1, got {images}")
    lo, hi = size_range
    if not 16 <= lo <= hi:
        raise UserError(f"size_range must satisfy 16 <= low <= high, got {size_range}")
    if style not in SAMPLE_STYLES:
        raise UserError(
            f"unknown sample style {style!r}; expected one of {', '.join(SAMPLE_STYLES)}"
        )
    if not 0.0 <= unlabelled < 1.0:
        raise UserError(f"unlabelled must be a fraction in [0, 1), got {unlabelled}")
    out = []
    for i in range(images):
        sample = _generate_one(seed, i, (lo, hi), SAMPLE_STYLES[style])
        _unlabel(sample.objects, unlabelled, seed, i)
        out.append(sample)
    return out


# ----------------------------------------------------------------------------- writers


def sample_image_id(format: str, index: int) -> str:
    """The image id the reader of ``format`` reports for sample image ``index``."""
    return _ID_MAKERS[format](index)


_ID_MAKERS: dict[str, Callable[[int], str]] = {
    "folder": lambda i: f"sample_{i:04d}",
    "sa1b": lambda i: f"sa_{i + 1}",
    "coco": lambda i: str(i + 1),
}


def _save_image(image: np.ndarray, path: Path) -> None:
    if path.suffix == ".jpg":
        Image.fromarray(image).save(path, quality=JPEG_QUALITY, subsampling=0)
    else:
        Image.fromarray(image).save(path)


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of an (H, W) bool mask: column-major run lengths, zeros first.

    pycocotools only writes the compressed form, and COCO crowd annotations use this one.
    """
    flat = mask.reshape(-1, order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _bbox_area(rle: dict[str, Any]) -> tuple[list[float], int]:
    return [float(v) for v in mask_utils.toBbox(rle)], int(mask_utils.area(rle))


def _write_folder(out: Path, images: list[SyntheticImage], style: SampleStyle) -> None:
    (out / "image").mkdir()
    (out / "mask").mkdir()
    for sample in images:
        stem = sample_image_id("folder", sample.index)
        _save_image(
            sample.image, out / "image" / f"{stem}{'.png' if sample.index % 2 == 0 else '.jpg'}"
        )
        mask_dir = out / "mask" / stem
        mask_dir.mkdir()
        for k, obj in enumerate(sample.annotated):
            Image.fromarray(obj.visible.astype(np.uint8) * 255).save(mask_dir / f"{k}.png")


def _inner_point(mask: np.ndarray) -> list[list[float]]:
    """The pixel centre deepest inside ``mask`` (largest distance to the background), as (x, y)."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return [[float(x) + 0.5, float(y) + 0.5]]


def _write_sa1b(out: Path, images: list[SyntheticImage], style: SampleStyle) -> None:
    for sample in images:
        image_id = sample_image_id("sa1b", sample.index)
        h, w = sample.image.shape[:2]
        rng = np.random.default_rng([sample.index, 1])
        annotations = []
        for k, obj in enumerate(sample.annotated):
            rle = _compressed_rle(obj.visible)
            bbox, area = _bbox_area(rle)
            annotations.append(
                {
                    "id": sample.index * 1000 + k,
                    "segmentation": rle,
                    "area": area,
                    "bbox": bbox,
                    "predicted_iou": round(float(rng.uniform(0.85, 1.0)), 4),
                    "stability_score": round(float(rng.uniform(0.9, 1.0)), 4),
                    "point_coords": _inner_point(obj.visible),
                    "crop_box": [0.0, 0.0, float(w), float(h)],
                }
            )
        info = {
            "image_id": sample.index + 1,
            "width": w,
            "height": h,
            "file_name": f"{image_id}.jpg",
        }
        _save_image(sample.image, out / f"{image_id}.jpg")
        (out / f"{image_id}.json").write_text(
            json.dumps({"image": info, "annotations": annotations})
        )


def _coco_segmentation(
    obj: SyntheticObject, occluded_seen: int
) -> dict[str, Any] | list[list[float]]:
    if not obj.occluded:
        return [obj.polygon]
    return _compressed_rle(obj.visible) if occluded_seen % 2 == 0 else uncompressed_rle(obj.visible)


def _write_coco(out: Path, images: list[SyntheticImage], style: SampleStyle) -> None:
    (out / "images").mkdir()
    (out / "annotations").mkdir()
    entries, annotations = [], []
    categories = {kind: k + 1 for k, kind in enumerate(style.shapes)}
    crowd_category = len(categories) + 1
    occluded_seen = 0
    for sample in images:
        image_id = sample.index + 1
        h, w = sample.image.shape[:2]
        file_name = f"{image_id:012d}.jpg"
        _save_image(sample.image, out / "images" / file_name)
        entries.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for obj in sample.annotated:
            segmentation = _coco_segmentation(obj, occluded_seen)
            occluded_seen += obj.occluded
            bbox, area = _bbox_area(_compressed_rle(obj.visible))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": categories[obj.kind],
                    "segmentation": segmentation,
                    "area": area,
                    "bbox": bbox,
                    "iscrowd": 0,
                }
            )
        if sample.index == 0 and sample.annotated:
            union = np.any([obj.visible for obj in sample.annotated], axis=0)
            bbox, area = _bbox_area(_compressed_rle(union))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": crowd_category,
                    "segmentation": uncompressed_rle(union),
                    "area": area,
                    "bbox": bbox,
                    "iscrowd": 1,
                }
            )
    cats = [{"id": v, "name": k, "supercategory": "shape"} for k, v in categories.items()]
    cats.append({"id": crowd_category, "name": "group", "supercategory": "shape"})
    doc = {
        "info": {"description": "maskteacher synthetic sample"},
        "images": entries,
        "annotations": annotations,
        "categories": cats,
    }
    (out / "annotations" / "instances.json").write_text(json.dumps(doc))


_WRITERS: dict[str, Callable[[Path, list[SyntheticImage], SampleStyle], None]] = {
    "folder": _write_folder,
    "sa1b": _write_sa1b,
    "coco": _write_coco,
}
SAMPLE_FORMATS: tuple[str, ...] = tuple(_WRITERS)


def make_sample(
    out: str | Path,
    *,
    format: str = "folder",
    images: int = 8,
    seed: int = 0,
    size_range: tuple[int, int] = (96, 200),
    style: str = DEFAULT_STYLE,
    unlabelled: float = 0.0,
) -> Path:
    """Write a synthetic dataset of ``images`` images in ``format`` to the new folder ``out``
    (``style`` and ``unlabelled`` as in :func:`generate_sample`).

    ``out`` must not exist or be empty. Everything is written to a temporary sibling folder
    that is renamed to ``out`` at the end, so an interrupted run leaves nothing half-written.
    Returns ``out``.
    """
    out = Path(out)
    writer = _WRITERS.get(format)
    if writer is None:
        raise UserError(
            f"unknown sample format {format!r}; expected one of {', '.join(SAMPLE_FORMATS)}"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"{out} already exists and is not an empty folder; choose a new output path"
        )
    generated = generate_sample(
        images, seed, size_range=size_range, style=style, unlabelled=unlabelled
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary dataset folder
    try:
        writer(tmp, generated, SAMPLE_STYLES[style])
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
