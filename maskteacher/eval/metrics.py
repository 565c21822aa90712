"""Everything-mode metrics on binary masks in the original frame.

Conventions: masks are ``(N, H, W)`` bool arrays of one image (predictions with a score each, or
ground truth). IoU and average recall use pycocotools (RLE IoU and ``COCOeval``); boundary IoU
follows Cheng et al. 2021 ("Boundary IoU: Improving Object-Centric Image Segmentation
Evaluation"): a mask's boundary region is the mask minus its erosion by ``d`` pixels, with
``d = dilation_ratio * image diagonal`` (0.02 by default), and boundary IoU is the IoU of the two
boundary regions. Written with scipy's binary erosion (3x3 structuring element, pixels outside the
image count as background, so objects touching the border have a boundary there too).
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

AR_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool -> pycocotools RLEs (Fortran order, as pycocotools requires)."""
    if len(masks) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Pairwise IoU. pred (N, H, W) bool, gt (M, H, W) bool -> (N, M) float64."""
    if len(pred) == 0 or len(gt) == 0:
        return np.zeros((len(pred), len(gt)), dtype=np.float64)
    ious = mask_utils.iou(encode_masks(pred), encode_masks(gt), [0] * len(gt))
    return np.asarray(ious, dtype=np.float64).reshape(len(pred), len(gt))


def best_match_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """For each GT mask the IoU of its best-overlapping prediction. -> (M,) float64 (0 without predictions)."""
    ious = mask_iou(pred, gt)
    if ious.shape[0] == 0:
        return np.zeros(len(gt), dtype=np.float64)
    return ious.max(axis=0)


def boundary_region(mask: np.ndarray, dilation: int) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: pixels of ``mask`` within ``dilation`` pixels of its contour."""
    if dilation < 1 or not mask.any():
        return mask.copy()
    eroded = ndimage.binary_erosion(
        mask, structure=np.ones((3, 3), bool), iterations=dilation, border_value=0
    )
    return mask & ~eroded


def boundary_dilation(hw: tuple[int, int], dilation_ratio: float = 0.02) -> int:
    """Boundary width in pixels for an image of size hw: ratio * diagonal, at least 1."""
    return max(1, int(round(dilation_ratio * math.hypot(*hw))))


def boundary_iou(pred: np.ndarray, gt: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU of two (H, W) bool masks; 1.0 when both are empty, 0.0 when only one is."""
    d = boundary_dilation(gt.shape, dilation_ratio)
    pb, gb = boundary_region(pred, d), boundary_region(gt, d)
    union = np.logical_or(pb, gb).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pb, gb).sum() / union)


@dataclass
class ImageResult:
    """One image's predictions and ground truth, everything in the original frame."""

    image_id: str
    pred_masks: np.ndarray  # (N, H, W) bool
    pred_scores: np.ndarray  # (N,) float, higher first for AR's top-K
    gt_masks: np.ndarray  # (M, H, W) bool
    seconds: float = 0.0  # inference time of this image
    teacher_masks: np.ndarray | None = None  # (T, H, W) bool, cached teacher masks when available


@dataclass
class ImageMetrics:
    image_id: str
    num_gt: int
    num_pred: int
    mean_best_iou: float  # over this image's GT masks (nan without GT)
    boundary_iou: float  # mean over matched pairs (best match, IoU >= 0.5) (nan without pairs)
    ms: float
    teacher_agreement: float | None  # mean over teacher masks of the best student IoU


@dataclass
class DatasetMetrics:
    images: int
    mean_best_iou: float
    ar10: float
    ar100: float
    boundary_iou: float
    masks_per_image: float
    ms_per_image: float
    teacher_agreement: float | None
    per_image: list[ImageMetrics] = field(default_factory=list)

    def summary(self) -> dict:
        """The JSON-ready figures (metrics.json), without the per-image rows."""
        return {
            "images": self.images,
            "mean_best_iou": self.mean_best_iou,
            "ar10": self.ar10,
            "ar100": self.ar100,
            "boundary_iou": self.boundary_iou,
            "masks_per_image": self.masks_per_image,
            "ms_per_image": self.ms_per_image,
            "teacher_agreement": self.teacher_agreement,
        }


def evaluate_image(
    result: ImageResult, *, boundary_match_iou: float = 0.5
) -> tuple[ImageMetrics, np.ndarray, list[float]]:
    """Per-image figures. Returns (metrics, best IoU per GT (M,), boundary IoUs of matched pairs)."""
    ious = mask_iou(result.pred_masks, result.gt_masks)
    best = ious.max(axis=0) if ious.shape[0] else np.zeros(len(result.gt_masks))
    boundaries = []
    if ious.shape[0] and ious.shape[1]:
        best_pred = ious.argmax(axis=0)
        for g, p in enumerate(best_pred):
            if ious[p, g] >= boundary_match_iou:
                boundaries.append(boundary_iou(result.pred_masks[p], result.gt_masks[g]))
    agreement = None
    if result.teacher_masks is not None:
        agreement_per_mask = best_match_iou(result.pred_masks, result.teacher_masks)
        agreement = float(agreement_per_mask.mean()) if len(agreement_per_mask) else float("nan")
    metrics = ImageMetrics(
        image_id=result.image_id,
        num_gt=len(result.gt_masks),
        num_pred=len(result.pred_masks),
        mean_best_iou=float(best.mean()) if len(best) else float("nan"),
        boundary_iou=float(np.mean(boundaries)) if boundaries else float("nan"),
        ms=result.seconds * 1000.0,
        teacher_agreement=agreement,
    )
    return metrics, best, boundaries


@dataclass
class _RecallImage:
    """What average recall needs of one image: RLEs, scores and the image size."""

    height: int
    width: int
    gt_rles: list[dict]
    gt_areas: list[float]
    pred_rles: list[dict]
    pred_scores: list[float]

    @classmethod
    def from_result(cls, r: ImageResult) -> _RecallImage:
        h, w = r.gt_masks.shape[1:] if r.gt_masks.ndim == 3 else r.pred_masks.shape[1:]
        return cls(
            height=int(h),
            width=int(w),
            gt_rles=encode_masks(r.gt_masks),
            gt_areas=[float(m.sum()) for m in r.gt_masks],
            pred_rles=encode_masks(r.pred_masks),
            pred_scores=[float(s) for s in r.pred_scores],
        )


def average_recall(
    results: list[ImageResult], max_dets: tuple[int, ...] = (10, 100)
) -> dict[int, float]:
    """COCO-style class-agnostic average recall over IoU 0.5:0.95 for each top-K (pycocotools COCOeval).

    Returns {K: AR@K}; nan when there is no ground truth at all.
    """
    return _average_recall([_RecallImage.from_result(r) for r in results], max_dets)


def _average_recall(images: list[_RecallImage], max_dets: tuple[int, ...]) -> dict[int, float]:
    gt_ds = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    detections = []
    ann_id = 1
    for index, im in enumerate(images, start=1):
        gt_ds["images"].append({"id": index, "height": im.height, "width": im.width})
        for rle, area in zip(im.gt_rles, im.gt_areas):
            gt_ds["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": index,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": rle,
                    "area": area,
                    "bbox": list(mask_utils.toBbox(rle)),
                }
            )
            ann_id += 1
        for rle, score in zip(im.pred_rles, im.pred_scores):
            detections.append(
                {"image_id": index, "category_id": 1, "segmentation": rle, "score": score}
            )
    if not gt_ds["annotations"]:
        return {k: float("nan") for k in max_dets}
    if not detections:
        return {k: 0.0 for k in max_dets}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_ds
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.params.useCats = 0
        evaluator.params.maxDets = sorted(max_dets)
        evaluator.params.areaRng = [[0, 1e10]]
        evaluator.params.areaRngLbl = ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
    recall = evaluator.eval["recall"]  # (T, K, A, M), -1 where undefined
    out = {}
    for m, k in enumerate(evaluator.params.maxDets):
        values = recall[:, 0, 0, m]
        out[k] = float(values[values > -1].mean()) if (values > -1).any() else float("nan")
    return out


class MetricsAccumulator:
    """Adds images one at a time (dense masks are dropped after each image; RLEs are kept for AR)."""

    def __init__(self) -> None:
        self.per_image: list[ImageMetrics] = []
        self._best: list[float] = []
        self._boundaries: list[float] = []
        self._agreements: list[float] = []
        self._has_teacher = False
        self._recall: list[_RecallImage] = []

    def add(self, result: ImageResult) -> ImageMetrics:
        metrics, best, boundaries = evaluate_image(result)
        self.per_image.append(metrics)
        self._best.extend(best.tolist())
        self._boundaries.extend(boundaries)
        if result.teacher_masks is not None:
            self._has_teacher = True
            if not math.isnan(metrics.teacher_agreement):
                self._agreements.append(metrics.teacher_agreement)
        self._recall.append(_RecallImage.from_result(result))
        return metrics

    def finish(self) -> DatasetMetrics:
        ar = _average_recall(self._recall, (10, 100))
        rows = self.per_image
        agreement = None
        if self._has_teacher:
            agreement = float(np.mean(self._agreements)) if self._agreements else float("nan")
        return DatasetMetrics(
            images=len(rows),
            mean_best_iou=float(np.mean(self._best)) if self._best else float("nan"),
            ar10=ar[10],
            ar100=ar[100],
            boundary_iou=float(np.mean(self._boundaries)) if self._boundaries else float("nan"),
            masks_per_image=float(np.mean([m.num_pred for m in rows])) if rows else float("nan"),
            ms_per_image=float(np.mean([m.ms for m in rows])) if rows else float("nan"),
            teacher_agreement=agreement,
            per_image=rows,
        )


def evaluate(results: list[ImageResult]) -> DatasetMetrics:
    """Dataset figures: means over all GT masks / matched pairs / images, AR@10 and AR@100."""
    acc = MetricsAccumulator()
    for r in results:
        acc.add(r)
    return acc.finish()
