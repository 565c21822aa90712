"""``sa1b`` format, the SA-1B release layout::

    ROOT/<id>.jpg     the image
    ROOT/<id>.json    {"image": {"image_id", "width", "height", "file_name"},
                       "annotations": [{"id", "segmentation": {"size": [h, w], "counts": str},
                                        "area", "bbox", "predicted_iou", "stability_score",
                                        "point_coords", "crop_box"}, ...]}

Image ids are the file stems, sorted as strings; hidden files (names starting with '.') are
ignored. Masks are the annotations in file order, decoded with pycocotools. The open-time scan
parses every JSON once, counting masks and validating every RLE (size, run lengths: see
:mod:`maskteacher.data.segmentation`); masks are decoded from a fresh parse on access, so
nothing large stays in memory.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from maskteacher.data._io import (
    IMAGE_SUFFIXES,
    BadItem,
    BadItemLog,
    progress,
    read_json,
    visible_files,
)
from maskteacher.data.dataset import BaseDataset, Item
from maskteacher.data.images import image_header, size_mismatch
from maskteacher.data.segmentation import check_rles, decode_rles, rle_areas, to_rle
from maskteacher.errors import UserError


def _annotations(
    data: Any, json_path: Path, hw: tuple[int, int], orientation: int = 1
) -> list[dict[str, Any]]:
    """The checked ``annotations`` list of one SA-1B JSON document (every RLE validated)."""
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise BadItem(json_path, 'expected an object with an "annotations" list (SA-1B layout)')
    info = data.get("image")
    has_size = isinstance(info, dict) and "height" in info and "width" in info
    if has_size and (info["height"], info["width"]) != hw:
        said = (info["height"], info["width"])
        raise BadItem(json_path, size_mismatch('"image"', said, hw, orientation))
    annotations = data["annotations"]
    segmentations, wheres = [], []
    for k, ann in enumerate(annotations):
        ann_id = ann.get("id", k) if isinstance(ann, dict) else k
        segmentations.append(ann.get("segmentation") if isinstance(ann, dict) else None)
        wheres.append(f"{json_path} (annotation {ann_id})")
    check_rles(segmentations, hw, wheres, orientation=orientation)
    return annotations


def _rles(json_path: Path, hw: tuple[int, int], num_masks: int) -> list[dict[str, Any]]:
    """The compressed RLEs of the annotation file, re-read and re-checked on access."""
    try:
        annotations = _annotations(read_json(json_path)[0], json_path, hw)
    except BadItem as exc:
        raise UserError(f"{exc.item}: {exc.reason}") from None
    if len(annotations) != num_masks:
        raise UserError(
            f"{json_path}: has {len(annotations)} annotations now but {num_masks} when the "
            "dataset was opened; expected the file not to change"
        )
    return [to_rle(ann["segmentation"], hw) for ann in annotations]


def _load_masks(json_path: Path, hw: tuple[int, int], num_masks: int) -> np.ndarray:
    """(M, H, W) bool decoded from the annotation file's RLEs."""
    return decode_rles(_rles(json_path, hw, num_masks), hw)


def _summary(json_path: Path, hw: tuple[int, int], num_masks: int) -> tuple[np.ndarray, int]:
    """(M,) foreground areas from the RLEs (no decoding); RLEs never need an inferred rule."""
    return rle_areas(_rles(json_path, hw, num_masks)), 0


def _scan_item(image_id: str, image_path: Path, json_path: Path) -> Item:
    hw, orientation = image_header(image_path)
    data, annotation_digest = read_json(json_path)
    num_masks = len(_annotations(data, json_path, hw, orientation))
    return Item(
        image_id=image_id,
        image_path=image_path,
        hw=hw,
        num_masks=num_masks,
        mask_loader=functools.partial(_load_masks, json_path, hw, num_masks),
        summary_loader=functools.partial(_summary, json_path, hw, num_masks),
        annotation_digest=annotation_digest,
        orientation=orientation,
    )


class SA1BDataset(BaseDataset):
    """Reader for SA-1B style ``<id>.jpg`` + ``<id>.json`` pairs (see the module docstring)."""

    format = "sa1b"

    @classmethod
    def open(cls, root: Path, *, skip_bad: bool = False) -> SA1BDataset:
        if not root.is_dir():
            raise UserError(
                f"{root}: not a folder; expected ROOT/<id>.jpg + ROOT/<id>.json (SA-1B)"
            )
        images: dict[str, list[Path]] = {}
        jsons: dict[str, Path] = {}
        for path in visible_files(root, IMAGE_SUFFIXES):
            images.setdefault(path.stem, []).append(path)
        for path in visible_files(root, (".json",)):
            jsons[path.stem] = path
        bad = BadItemLog(skip_bad=skip_bad)
        for stem in sorted(set(jsons) - set(images)):
            bad.handle(
                BadItem(
                    jsons[stem], "annotation file without an image of the same stem", kind="image"
                )
            )
        items: list[Item] = []
        stems = sorted(images)
        for stem in progress(stems, total=len(stems), desc=f"checking {root.name}"):
            try:
                paths = sorted(images[stem])
                if len(paths) > 1:
                    names = ", ".join(p.name for p in paths)
                    raise BadItem(
                        root / stem,
                        f"several images share the stem ({names}); expected one",
                        kind="image",
                    )
                if stem not in jsons:
                    raise BadItem(paths[0], f"no annotation file {stem}.json beside the image")
                items.append(_scan_item(stem, paths[0], jsons[stem]))
            except BadItem as exc:
                bad.handle(exc)
        return cls(root, items, bad)
