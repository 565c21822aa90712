"""``folder`` format, the origin project's layout::

    ROOT/image/<stem>.jpg | .jpeg | .png      one file per image (suffix case-insensitive)
    ROOT/mask/<stem>/<k>.png                  one binary PNG per object, foreground = value > 127

Image ids are the stems, sorted. Masks of an image are ordered by file name with digit runs
compared as numbers (``2.png`` before ``10.png``). A missing ``ROOT/mask/<stem>/`` folder or one
with no PNGs means the image has zero objects (valid). Files with other suffixes and hidden
files (names starting with '.') are ignored.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from pathlib import Path

import numpy as np

from maskteacher.data._io import (
    IMAGE_SUFFIXES,
    BadItem,
    BadItemLog,
    check_mask_file,
    image_header,
    load_binary_mask,
    natural_key,
    progress,
    visible_files,
)
from maskteacher.data.dataset import BaseDataset, Item
from maskteacher.errors import UserError


def _load_masks(paths: tuple[Path, ...], hw: tuple[int, int]) -> np.ndarray:
    """(M, H, W) bool from one PNG per object."""
    if not paths:
        return np.zeros((0, *hw), dtype=bool)
    return np.stack([load_binary_mask(path, hw) for path in paths])


def _mask_files(mask_dir: Path) -> list[Path]:
    if not mask_dir.is_dir():
        return []
    files = visible_files(mask_dir, (".png",))
    return sorted(files, key=lambda p: natural_key(p.name))


def _scan_item(image_id: str, image_path: Path, mask_root: Path) -> Item:
    hw = image_header(image_path)
    mask_paths = tuple(_mask_files(mask_root / image_id))
    for path in mask_paths:
        check_mask_file(path, hw)
    return Item(
        image_id=image_id,
        image_path=image_path,
        file_size=image_path.stat().st_size,
        hw=hw,
        num_masks=len(mask_paths),
        mask_loader=functools.partial(_load_masks, mask_paths, hw),
    )


class FolderDataset(BaseDataset):
    """Reader for ``ROOT/image`` + ``ROOT/mask`` (see the module docstring)."""

    format = "folder"

    @classmethod
    def open(cls, root: Path, *, skip_bad: bool = False) -> FolderDataset:
        image_dir, mask_root = root / "image", root / "mask"
        if not image_dir.is_dir():
            raise UserError(f"{root}: no image/ folder; expected ROOT/image/<stem>.jpg|png")
        if not mask_root.is_dir():
            raise UserError(f"{root}: no mask/ folder; expected ROOT/mask/<stem>/<k>.png")
        by_stem: dict[str, list[Path]] = defaultdict(list)
        for path in visible_files(image_dir, IMAGE_SUFFIXES):
            by_stem[path.stem].append(path)
        bad = BadItemLog(skip_bad=skip_bad)
        items: list[Item] = []
        stems = sorted(by_stem)
        for stem in progress(stems, total=len(stems), desc=f"checking {root.name}"):
            paths = sorted(by_stem[stem])
            try:
                if len(paths) > 1:
                    names = ", ".join(p.name for p in paths)
                    raise BadItem(
                        image_dir / stem, f"several images share the stem ({names}); expected one"
                    )
                items.append(_scan_item(stem, paths[0], mask_root))
            except BadItem as exc:
                bad.handle(exc)
        return cls(root, items, bad)
