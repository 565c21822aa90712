"""The trainer's ``visual`` section: overlay pictures of validation images during training.

Every ``visual.save_every_n_epochs`` epochs (main process only) the student runs in everything
mode on the first ``visual.num_images`` validation images -- ``dataset.grid_points`` prompts per
side, masks kept when their predicted IoU is at least ``visual.IOU_threshold``, then box NMS
(``precompute.box_nms_thresh``) -- and each image is drawn with the same code as
``maskteacher eval`` (:func:`maskteacher.viz.panels.save_overlay`): image | ground truth |
student | teacher (the teacher panel when ``mask_teacher.cache_path`` holds the validation split).

Files: ``<visual.save_path or model.save_path/visual>/epoch_<NNN>/<image_id>.png`` (epoch
counted from 0, as in the logs). Drawing uses no random numbers, so it does not change the
training run (resume stays bit-identical).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from maskteacher.data import to_model_input
from maskteacher.data.dataset import SegmentationDataset
from maskteacher.models.everything import generate_everything, lowres_to_masks
from maskteacher.viz.cached_teacher import open_teacher_cache, teacher_masks_original
from maskteacher.viz.panels import safe_file_name, save_overlay

log = logging.getLogger(__name__)


@dataclass
class VisualSettings:
    """What the ``visual`` section asks for, resolved against the rest of the config (folder:
    where epoch folders go; every: epochs between pictures; the rest: the everything-mode
    generation of the pictures)."""

    folder: Path
    every: int
    num_images: int
    iou_threshold: float
    points_per_side: int
    points_per_batch: int
    box_nms_thresh: float
    multimask_output: bool
    bf16: bool

    def due(self, epoch: int) -> bool:
        """Whether overlays are saved after ``epoch`` (0-based): every ``every``-th epoch."""
        return (epoch + 1) % self.every == 0


class ValidationPictures:
    """Draws the overlays; opens the validation dataset and the teacher cache once, at the first
    drawing.

    open_images: opens the validation dataset; teacher_cache: the teacher cache to draw the
    teacher panel from (None: no teacher panel); image_size: S.
    """

    def __init__(
        self,
        settings: VisualSettings,
        *,
        open_images: Callable[[], SegmentationDataset],
        teacher_cache: str | None,
        image_size: int,
    ) -> None:
        self.settings = settings
        self.open_images = open_images
        self.teacher_cache = teacher_cache
        self.image_size = image_size
        self._dataset: SegmentationDataset | None = None
        self._teacher = None
        self._teacher_ids: set[str] = set()

    def _open(self) -> SegmentationDataset:
        if self._dataset is None:
            self._dataset = self.open_images()
            self._teacher = open_teacher_cache(self.teacher_cache, "val", self.image_size)
            if self._teacher is not None:
                self._teacher_ids = set(self._teacher.image_ids)
        return self._dataset

    @torch.no_grad()
    def save(self, sam: nn.Module, epoch: int, device: torch.device) -> list[Path]:
        """Draw the first ``num_images`` validation images with ``sam``; returns the PNG paths.

        The model is put in eval mode for the pass and restored to its previous mode afterwards.
        """
        dataset = self._open()
        folder = self.settings.folder / f"epoch_{epoch:03d}"
        was_training = sam.training
        sam.eval()
        try:
            count = min(self.settings.num_images, len(dataset))
            paths = [self._draw(sam, dataset[i], epoch, folder, device) for i in range(count)]
        finally:
            sam.train(was_training)
        log.info("epoch %d: %d overlay picture(s) in %s", epoch, len(paths), folder)
        return paths

    def _student_masks(self, sam: nn.Module, image: np.ndarray, device: torch.device):
        """(N, H, W) bool everything-mode masks of ``sam`` on one (H, W, 3) image."""
        s = self.settings
        orig_hw = image.shape[:2]
        tensor, input_hw = to_model_input(image, self.image_size)
        result = generate_everything(
            sam,
            tensor[None].to(device),
            [input_hw],
            [orig_hw],
            points_per_side=s.points_per_side,
            points_per_batch=s.points_per_batch,
            pred_iou_thresh=s.iou_threshold,
            stability_score_thresh=0.0,
            box_nms_thresh=s.box_nms_thresh,
            multimask_output=s.multimask_output,
            bf16=s.bf16,
        )[0]
        masks = lowres_to_masks(
            result.logits, image_size=self.image_size, input_hw=input_hw, orig_hw=orig_hw
        )
        return masks.cpu().numpy(), input_hw

    def _draw(self, sam: nn.Module, sample, epoch: int, folder: Path, device) -> Path:
        student, input_hw = self._student_masks(sam, sample.image, device)
        teacher = None
        if self._teacher is not None:
            teacher = teacher_masks_original(
                self._teacher,
                self._teacher_ids,
                sample.image_id,
                image_size=self.image_size,
                input_hw=input_hw,
                orig_hw=sample.image.shape[:2],
            )
        gt = np.asarray(sample.masks, bool)
        captions = {
            "ground truth": f"ground truth ({len(gt)})",
            "student": f"student, epoch {epoch} ({len(student)})",
        }
        if teacher is not None:
            captions["teacher"] = f"teacher ({len(teacher)})"
        path = folder / f"{safe_file_name(sample.image_id)}.png"
        return save_overlay(path, sample.image, gt, student, teacher, captions=captions)
