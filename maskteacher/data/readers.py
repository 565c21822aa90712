"""Format registry, format detection and :func:`open_dataset`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from maskteacher.data._io import IMAGE_SUFFIXES
from maskteacher.data.coco import CocoDataset
from maskteacher.data.dataset import SegmentationDataset
from maskteacher.data.folder import FolderDataset
from maskteacher.data.sa1b import SA1BDataset
from maskteacher.errors import UserError


def _open_folder(path: Path, *, skip_bad: bool, image_root: Path | None, include_crowd: bool):
    _no_image_root("folder", image_root)
    return FolderDataset.open(path, skip_bad=skip_bad)


def _open_sa1b(path: Path, *, skip_bad: bool, image_root: Path | None, include_crowd: bool):
    _no_image_root("sa1b", image_root)
    return SA1BDataset.open(path, skip_bad=skip_bad)


def _open_coco(path: Path, *, skip_bad: bool, image_root: Path | None, include_crowd: bool):
    return CocoDataset.open(
        path, skip_bad=skip_bad, image_root=image_root, include_crowd=include_crowd
    )


def _no_image_root(fmt: str, image_root: Path | None) -> None:
    if image_root is not None:
        raise UserError(f"image_root applies to the coco format only, not {fmt}")


# format name -> opener; ``include_crowd`` matters only for coco (the others have no crowd).
_OPENERS: dict[str, Callable[..., SegmentationDataset]] = {
    "folder": _open_folder,
    "sa1b": _open_sa1b,
    "coco": _open_coco,
}
DATASET_FORMATS: tuple[str, ...] = tuple(_OPENERS)


def _has_sa1b_pair(path: Path) -> bool:
    names = {p.name for p in path.iterdir()}
    return any(
        Path(name).suffix.lower() in IMAGE_SUFFIXES and f"{Path(name).stem}.json" in names
        for name in names
    )


def detect_format(path: str | Path) -> str:
    """The format of the dataset at ``path``.

    ``folder`` if ``PATH/image`` is a folder; ``coco`` if PATH is a .json file or a folder with
    ``annotations/instances*.json``; ``sa1b`` if PATH holds an image (.jpg/.jpeg/.png) with a
    same-stem .json. Otherwise a UserError listing what was looked for.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset path {path} does not exist")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco"
        raise UserError(f"{path}: a file but not a .json; expected a dataset folder or a COCO JSON")
    if (path / "image").is_dir():
        return "folder"
    if any((path / "annotations").glob("instances*.json")):
        return "coco"
    if _has_sa1b_pair(path):
        return "sa1b"
    raise UserError(
        f"{path}: cannot tell the dataset format; looked for image/ (folder), "
        "annotations/instances*.json or a .json file (coco), <id>.jpg + <id>.json (sa1b); "
        "pass the format explicitly if the layout is one of these"
    )


def open_dataset(
    path: str | Path,
    format: str | None = None,
    *,
    skip_bad: bool = False,
    image_root: str | Path | None = None,
    include_crowd: bool = False,
) -> SegmentationDataset:
    """Open the dataset at ``path`` (format detected when ``format`` is None).

    Args:
        path: dataset root folder (folder, sa1b), or COCO instances JSON / folder holding one.
        format: one of DATASET_FORMATS, or None to detect.
        skip_bad: log and record bad items in ``bad_items`` and leave them out, instead of
            raising UserError on the first one.
        image_root: coco only: the folder holding the images.
        include_crowd: coco only: keep ``iscrowd`` annotations as masks.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset path {path} does not exist")
    if format is None:
        format = detect_format(path)
    opener = _OPENERS.get(format)
    if opener is None:
        raise UserError(
            f"unknown dataset format {format!r}; expected one of {', '.join(DATASET_FORMATS)}"
        )
    return opener(
        path,
        skip_bad=skip_bad,
        image_root=None if image_root is None else Path(image_root),
        include_crowd=include_crowd,
    )
