"""``coco`` format: a COCO instances JSON plus a folder of images.

``PATH`` is the JSON file, or a folder holding exactly one ``annotations/instances*.json``.
Each annotation's ``segmentation`` may be polygons (``[[x1, y1, x2, y2, ...], ...]``), an
uncompressed RLE (``{"size": [h, w], "counts": [int, ...]}``) or a compressed RLE (``counts``
string); all are validated at open time (:mod:`maskteacher.data.segmentation`: RLE run lengths,
finite and bounded polygon coordinates) and decoded with pycocotools (``frPyObjects`` /
``merge`` / ``decode``, the same steps as ``COCO.annToMask``). Annotations with ``iscrowd: 1``
are skipped unless ``include_crowd``.

Image ids are ``str(image["id"])``, ordered by numeric id (by string when ids are not all
integers). Masks of an image are its annotations in file order.

Image files are ``<image folder>/<file_name>``. The image folder is ``image_root`` when given;
otherwise the first of these that holds the listed files: ``<json dir>/../images``,
``<json dir>/images``, ``<json dir>``, and for ``instances_<split>.json`` also
``<json dir>/../<split>`` and ``<json dir>/../images/<split>`` (the COCO release layout).

A JSON that does not parse, or lacks the ``images`` / ``annotations`` lists, is a UserError even
with ``skip_bad`` (there is nothing to skip to). One bad annotation makes its whole image a bad
item: training on an image with an object missing from its ground truth would teach the model
that the object is background.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from maskteacher.data._io import BadItem, BadItemLog, progress, read_json
from maskteacher.data.dataset import BaseDataset, Item
from maskteacher.data.fingerprint import combine
from maskteacher.data.images import image_header, size_mismatch
from maskteacher.data.segmentation import check_segmentations, decode_rles, rle_areas, to_rle
from maskteacher.errors import UserError

# How many leading images are probed when choosing the image folder.
_PROBE_IMAGES = 20


def find_annotation_json(path: Path) -> Path:
    """The instances JSON for ``path`` (a .json file, or a folder with annotations/instances*.json)."""
    if path.is_file():
        return path
    found = sorted((path / "annotations").glob("instances*.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"{path}: no annotations/instances*.json; expected a COCO instances JSON")
    names = ", ".join(str(p) for p in found)
    raise UserError(f"{path}: several instances JSONs ({names}); pass the one to use as the path")


def image_dir_candidates(json_path: Path) -> list[Path]:
    """Folders searched for the images when no ``image_root`` is given, in order."""
    here = json_path.parent
    candidates = [here.parent / "images", here / "images", here]
    stem = json_path.stem
    if stem.startswith("instances_") and len(stem) > len("instances_"):
        split = stem[len("instances_") :]
        candidates += [here.parent / split, here.parent / "images" / split]
    return candidates


def _choose_image_dir(json_path: Path, file_names: list[str], image_root: Path | None) -> Path:
    if image_root is not None:
        if not image_root.is_dir():
            raise UserError(
                f"image_root {image_root} is not a folder; expected the COCO images folder"
            )
        return image_root
    probe = file_names[:_PROBE_IMAGES]
    candidates = image_dir_candidates(json_path)
    for folder in candidates:
        if folder.is_dir() and any((folder / name).is_file() for name in probe):
            return folder
    if not probe:  # no images listed: any folder will do
        return candidates[0]
    looked = ", ".join(str(c) for c in candidates)
    raise UserError(
        f"{json_path}: cannot find image files such as {probe[0]!r}; looked in {looked} "
        "(pass image_root to say where they are)"
    )


def _load_masks(segmentations: tuple[Any, ...], hw: tuple[int, int]) -> np.ndarray:
    """(M, H, W) bool from checked COCO segmentations."""
    return decode_rles([to_rle(s, hw) for s in segmentations], hw)


def _summary(segmentations: tuple[Any, ...], hw: tuple[int, int]) -> tuple[np.ndarray, int]:
    """(M,) foreground areas of checked segmentations (RLE areas; no dense decoding)."""
    return rle_areas([to_rle(s, hw) for s in segmentations]), 0


def _parse(json_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bytes]:
    """(images, annotations, digest of the file's bytes) of a COCO instances JSON."""
    try:
        data, json_digest = read_json(json_path)
    except BadItem as exc:
        raise UserError(f"{exc.item}: {exc.reason}") from None
    if not isinstance(data, dict):
        raise UserError(
            f"{json_path}: expected a COCO instances object with images and annotations"
        )
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise UserError(f'{json_path}: no "{key}" list; expected a COCO instances JSON')
    return data["images"], data["annotations"], json_digest


def _sorted_images(
    json_path: Path, images: list[Any], bad: BadItemLog
) -> list[tuple[str, dict[str, Any]]]:
    """(image id string, entry) for well-formed entries, ordered by numeric id."""
    entries: dict[Any, dict[str, Any]] = {}
    for k, entry in enumerate(images):
        where = f"{json_path} (images[{k}])"
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            bad.handle(BadItem(where, 'image entry without "id" and "file_name"'))
        elif entry["id"] in entries:
            bad.handle(BadItem(where, f"duplicate image id {entry['id']!r}"))
        else:
            entries[entry["id"]] = entry
    if all(isinstance(i, int) for i in entries):
        order = sorted(entries)
    else:
        order = sorted(entries, key=str)
    return [(str(i), entries[i]) for i in order]


class CocoDataset(BaseDataset):
    """Reader for a COCO instances JSON (see the module docstring).

    ``root`` is the instances JSON; ``image_dir`` the folder the images were found in.
    """

    format = "coco"

    def __init__(self, root: Path, items: list[Item], bad: BadItemLog, image_dir: Path) -> None:
        super().__init__(root, items, bad)
        self.image_dir = image_dir

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        skip_bad: bool = False,
        image_root: Path | None = None,
        include_crowd: bool = False,
    ) -> CocoDataset:
        json_path = find_annotation_json(path)
        images, annotations, json_digest = _parse(json_path)
        # every image's key covers the whole file and the crowd option (module docstring)
        annotation_digest = combine([("instances", json_digest), ("crowd", bytes([include_crowd]))])
        bad = BadItemLog(skip_bad=skip_bad)
        ordered = _sorted_images(json_path, images, bad)
        image_dir = _choose_image_dir(
            json_path, [str(e["file_name"]) for _, e in ordered], image_root
        )

        per_image: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
        known = {image_id for image_id, _ in ordered}
        for k, ann in enumerate(annotations):
            if not isinstance(ann, dict) or "image_id" not in ann:
                bad.handle(
                    BadItem(f"{json_path} (annotations[{k}])", 'annotation without "image_id"')
                )
                continue
            if ann.get("iscrowd", 0) and not include_crowd:
                continue
            if str(ann["image_id"]) not in known:
                where = f"{json_path} (annotation {ann.get('id', k)})"
                bad.handle(BadItem(where, f"refers to image id {ann['image_id']!r}, not in images"))
                continue
            per_image[str(ann["image_id"])].append((ann.get("id", k), ann.get("segmentation")))

        items: list[Item] = []
        for image_id, entry in progress(
            ordered, total=len(ordered), desc=f"checking {json_path.name}"
        ):
            try:
                items.append(
                    _scan_item(
                        json_path,
                        image_id,
                        entry,
                        image_dir / entry["file_name"],
                        per_image[image_id],
                        annotation_digest,
                    )
                )
            except BadItem as exc:
                bad.handle(exc)
        return cls(json_path, items, bad, image_dir)


def _scan_item(
    json_path: Path,
    image_id: str,
    entry: dict[str, Any],
    image_path: Path,
    annotations: list[tuple[Any, Any]],
    annotation_digest: bytes,
) -> Item:
    hw, orientation = image_header(image_path)
    if "height" in entry and "width" in entry and (entry["height"], entry["width"]) != hw:
        said = (entry["height"], entry["width"])
        what = f"{json_path.name} image id {image_id}"
        raise BadItem(image_path, size_mismatch(what, said, hw, orientation))
    segmentations = tuple(s for _, s in annotations)
    wheres = [f"{json_path} (annotation {ann_id}, image {image_id})" for ann_id, _ in annotations]
    check_segmentations(segmentations, hw, wheres, orientation=orientation)
    return Item(
        image_id=image_id,
        image_path=image_path,
        hw=hw,
        num_masks=len(segmentations),
        mask_loader=functools.partial(_load_masks, segmentations, hw),
        summary_loader=functools.partial(_summary, segmentations, hw),
        annotation_digest=annotation_digest,
        orientation=orientation,
    )
