"""The figures of one precompute run and the lines ``maskteacher precompute`` prints."""

from __future__ import annotations

from dataclasses import dataclass

from maskteacher.models.everything import GenerationParams
from maskteacher.precompute.verify import TeacherVerifyResult

#: Warn when the teacher kept no mask on more than this fraction of the written images.
EMPTY_WARN_FRACTION = 0.5


@dataclass
class PrecomputeSummary:
    """Figures of one run, summed over the torchrun ranks of this task.

    planned: images of this task's shards (within ``limit``); cached_before: those already in
    finished shards; written / masks / bytes: what this run wrote; empty: written images on
    which the teacher kept no mask; failed: images that could not be processed (plus items the
    dataset scan skipped, counted by worker 0). wall_s: the run up to the last shard (startup,
    opening the data, building the teacher); generate_s: the generation loop from the first
    image to the last shard on disk (slowest rank), which ``images_per_s`` is measured on.
    generation / teacher_stored: the filters used and whether teacher masks were generated (for
    the empty-teacher warning).
    """

    cache_path: str
    workers: int
    planned: int
    cached_before: int
    written: int
    masks: int
    bytes: int
    failed: int
    wall_s: float
    generate_s: float
    max_failed_fraction: float
    empty: int = 0
    generation: GenerationParams | None = None
    teacher_stored: bool = True
    manifest_images: int | None = None
    verify: TeacherVerifyResult | None = None

    @property
    def failed_fraction(self) -> float:
        return self.failed / max(1, self.planned)

    @property
    def images_per_s(self) -> float:
        return self.written / self.generate_s if self.generate_s > 0 else 0.0

    @property
    def mostly_empty(self) -> bool:
        """The teacher kept no mask on most written images (its filters are likely too strict)."""
        return (
            self.teacher_stored
            and self.written > 0
            and self.empty > EMPTY_WARN_FRACTION * self.written
        )

    @property
    def exit_code(self) -> int:
        too_many = self.failed_fraction > self.max_failed_fraction
        return 1 if too_many or (self.verify is not None and not self.verify.ok) else 0

    def empty_warning(self) -> str:
        """The warning printed when :attr:`mostly_empty`, naming the filters to lower."""
        g = self.generation or GenerationParams()
        return (
            f"WARNING: the teacher kept no mask on {self.empty / self.written:.0%} of the images "
            f"written ({self.empty} of {self.written}); its filters are probably too strict for "
            f"this teacher: lower precompute.pred_iou_thresh (now {g.pred_iou_thresh:g}) and/or "
            f"precompute.stability_score_thresh (now {g.stability_score_thresh:g}), try them "
            "with --limit first, and precompute into a new cache folder"
        )

    def format(self) -> str:
        per_image = self.masks / self.written if self.written else 0.0
        kb = self.bytes / self.written / 1024 if self.written else 0.0
        lines = [
            f"precompute: {self.written} images written, {self.cached_before} already cached, "
            f"{self.failed} failed, of {self.planned} planned ({self.workers} worker(s))",
            f"  masks {self.masks} ({per_image:.1f} per image), {kb:.1f} KB per image, "
            f"wall {self.wall_s:.1f} s (generation {self.generate_s:.1f} s, "
            f"{self.images_per_s:.2f} images/s)",
        ]
        if self.manifest_images is not None:
            lines.append(f"  cache {self.cache_path}: {self.manifest_images} images in manifest")
        if self.mostly_empty:
            lines.append("  " + self.empty_warning())
        if self.failed_fraction > self.max_failed_fraction:
            lines.append(
                f"  FAILED: {self.failed_fraction:.2%} of the images failed, more than "
                f"precompute.max_failed_fraction = {self.max_failed_fraction:g} (see the "
                "manifest's failures)"
            )
        if self.verify is not None:
            lines.append(self.verify.format())
        return "\n".join(lines)
