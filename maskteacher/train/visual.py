"""The trainer's ``visual`` section: overlay pictures of validation images during training.

Every ``visual.save_every_n_epochs`` epochs (main process only) the student runs in everything
mode on the first ``visual.num_images`` validation images -- ``dataset.grid_points`` prompts per
side, masks kept when their predicted IoU is at least ``visual.IOU_threshold``, then box NMS
(``precompute.box_nms_thresh``) -- and each image is drawn with the same code as
``maskteacher eval`` (:func:`maskteacher.eval.pictures.save_overlay`): image | ground truth |
student | teacher (the teacher panel when ``mask_teacher.cache_path`` holds the validation split).

Files: ``<visual.save_path or model.save_path/visual>/epoch_<NNN>/<image_id>.png`` (epoch
counted from 0, as in the logs). Drawing uses no random numbers, so it does not change the
training run (resume stays bit-identical).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from maskteacher.config import Config
from maskteacher.data import open_dataset, to_model_input
from maskteacher.data.dataset import SegmentationDataset
from maskteacher.errors import UserError
from maskteacher.eval.pictures import save_overlay
from maskteacher.eval.run import open_teacher_cache, safe_file_name, teacher_masks_original
from maskteacher.models.everything import generate_everything, lowres_to_masks

log = logging.getLogger(__name__)


@dataclass
class VisualSettings:
    """What the ``visual`` section asks for, resolved against the rest of the config."""

    folder: Path
    every: int
    num_images: int
    iou_threshold: float
    points_per_side: int
    points_per_batch: int
    box_nms_thresh: float
    multimask_output: bool
    bf16: bool

    @classmethod
    def from_config(cls, cfg: Config) -> VisualSettings | None:
        """None when ``visual.status`` is off; a UserError when there is nothing to draw."""
        v = cfg.visual
        if not v.status:
            return None
        if not cfg.dataset.val_dataset:
            raise UserError(
                "visual.status is true but dataset.val_dataset is not set: the overlays are "
                "drawn from validation images"
            )
        if cfg.dataset.mode != "everything":
            raise UserError(
                f"visual.status is true with dataset.mode {cfg.dataset.mode!r}: the overlays "
                "show everything-mode results; use dataset.mode: everything or visual.status: false"
            )
        folder = Path(v.save_path) if v.save_path else Path(cfg.model.save_path) / "visual"
        return cls(
            folder=folder,
            every=v.save_every_n_epochs,
            num_images=v.num_images,
            iou_threshold=v.IOU_threshold,
            points_per_side=cfg.dataset.grid_points,
            points_per_batch=cfg.train.points_per_batch,
            box_nms_thresh=cfg.precompute.box_nms_thresh,
            multimask_output=cfg.model.multimask_output,
            bf16=cfg.train.bf16,
        )

    def due(self, epoch: int) -> bool:
        """Whether overlays are saved after ``epoch`` (0-based): every ``every``-th epoch."""
        return (epoch + 1) % self.every == 0


class ValidationPictures:
    """Draws the overlays; opens the validation dataset and the teacher cache once."""

    def __init__(self, cfg: Config, settings: VisualSettings) -> None:
        self.cfg = cfg
        self.settings = settings
        self.image_size = cfg.model.image_size
        self._dataset: SegmentationDataset | None = None
        self._teacher = None
        self._teacher_ids: set[str] = set()

    def _open(self) -> SegmentationDataset:
        if self._dataset is None:
            d = self.cfg.dataset
            self._dataset = open_dataset(
                d.val_dataset,
                d.format,
                skip_bad=d.skip_bad,
                image_root=d.image_root,
                include_crowd=d.include_crowd,
            )
            self._teacher = open_teacher_cache(self.cfg, "val", self.image_size)
            if self._teacher is not None:
                self._teacher_ids = set(self._teacher.image_ids)
        return self._dataset

    @torch.no_grad()
    def save(self, sam: nn.Module, epoch: int, device: torch.device) -> list[Path]:
        """Draw the first ``num_images`` validation images with ``sam``; returns the PNG paths.

        The model is put in eval mode for the pass and restored to its previous mode afterwards.
        """
        s = self.settings
        dataset = self._open()
        folder = s.folder / f"epoch_{epoch:03d}"
        was_training = sam.training
        sam.eval()
        paths = []
        try:
            for index in range(min(s.num_images, len(dataset))):
                sample = dataset[index]
                orig_hw = sample.image.shape[:2]
                image, input_hw = to_model_input(sample.image, self.image_size)
                result = generate_everything(
                    sam,
                    image[None].to(device),
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
                student = (
                    lowres_to_masks(
                        result.logits,
                        image_size=self.image_size,
                        input_hw=input_hw,
                        orig_hw=orig_hw,
                    )
                    .cpu()
                    .numpy()
                )
                teacher = None
                if self._teacher is not None:
                    teacher = teacher_masks_original(
                        self._teacher,
                        self._teacher_ids,
                        sample.image_id,
                        image_size=self.image_size,
                        input_hw=input_hw,
                        orig_hw=orig_hw,
                    )
                gt = np.asarray(sample.masks, bool)
                captions = {
                    "ground truth": f"ground truth ({len(gt)})",
                    "student": f"student, epoch {epoch} ({len(student)})",
                }
                if teacher is not None:
                    captions["teacher"] = f"teacher ({len(teacher)})"
                paths.append(
                    save_overlay(
                        folder / f"{safe_file_name(sample.image_id)}.png",
                        sample.image,
                        gt,
                        student,
                        teacher,
                        captions=captions,
                    )
                )
        finally:
            sam.train(was_training)
        log.info("epoch %d: %d overlay picture(s) in %s", epoch, len(paths), folder)
        return paths
