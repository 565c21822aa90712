"""Rank-0 training logs: TensorBoard scalars and the tqdm progress bar.

TensorBoard tags (written every ``log_every`` optimizer steps, averaged over the window; a
window cut short by the end of an epoch or of the run is written too, at its last step):
``train/task_loss`` (the weighted total, every term included), ``train/<term>`` for each loss
term, ``train/lr`` (the heads' group), ``train/matched_per_image``, ``train/matched_iou``,
``time/data_wait`` and ``time/step`` (seconds per micro-batch), ``time/images_per_s``; per
validation ``val/best_match_iou``. Ranks other than 0 log nothing. The event file (and its
folder) is created at the first write, so a run that refuses to start leaves nothing behind.

The progress bar shows the loss and the ``postfix_terms`` with 4 significant digits
(``soft=0.0001234``, not ``0.0000``), matched masks per image and images per second.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from maskteacher.train.run_folder import writing


class TrainLogger:
    """Accumulates per-micro-batch figures and writes window averages."""

    def __init__(
        self,
        log_dir: str | Path | None,
        *,
        log_every: int,
        enabled: bool,
        postfix_terms: tuple[str, ...] = ("soft",),
    ) -> None:
        """postfix_terms: loss terms also shown in the progress bar when a step computes them."""
        self.enabled = enabled
        self.postfix_terms = postfix_terms
        self.log_every = log_every
        self.log_dir = Path(log_dir) if enabled and log_dir is not None else None
        self._writer = None
        self._step = 0
        self._lr = 0.0
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self._bar: tqdm | None = None
        self._postfix: dict[str, float] = defaultdict(float)
        self._postfix_n = 0

    # -- progress bar ------------------------------------------------------------------------
    def start_epoch(self, epoch: int, total: int, initial: int = 0) -> None:
        if not self.enabled:
            return
        self._bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}", dynamic_ncols=True)

    def end_epoch(self) -> None:
        """Close the epoch's bar and write its last, possibly partial, window."""
        self.flush_window()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- per micro-batch ---------------------------------------------------------------------
    def micro_batch(
        self,
        *,
        total: float,
        terms: dict[str, float],
        matched: float,
        matched_iou_sum: float,
        images: int,
        data_wait: float,
        step_time: float,
    ) -> None:
        """Record one micro-batch (plain floats; call on every rank, only rank 0 keeps them)."""
        if not self.enabled:
            return
        s = self._sums
        s["task_loss"] += total
        for key, value in terms.items():
            s[key] += value
        s["matched"] += matched
        s["matched_iou_sum"] += matched_iou_sum
        s["images"] += images
        s["data_wait"] += data_wait
        s["step"] += step_time
        self._count += 1
        p = self._postfix
        p["loss"] += total
        p["matched"] += matched
        p["images"] += images
        p["seconds"] += data_wait + step_time
        for key in self.postfix_terms:
            if key in terms:
                p[key] += terms[key]
        self._postfix_n += 1
        if self._bar is not None:
            self._bar.update(1)

    @property
    def writer(self):
        """The TensorBoard writer, created at the first use (None when not logging)."""
        if self._writer is None and self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            with writing(self.log_dir, "TensorBoard log folder"):
                self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def optimizer_step(self, step: int, lr: float) -> None:
        """After optimizer step ``step`` (1-based count): write the window when it is due."""
        if not self.enabled:
            return
        self._step, self._lr = step, lr
        if self._bar is not None and self._postfix_n:
            p, n = self._postfix, self._postfix_n
            extra = {k: f"{p[k] / n:.4g}" for k in self.postfix_terms if k in p}
            self._bar.set_postfix(
                loss=f"{p['loss'] / n:.4g}",
                matched=f"{p['matched'] / max(p['images'], 1):.1f}",
                img_s=f"{p['images'] / max(p['seconds'], 1e-9):.1f}",
                **extra,
            )
            self._postfix.clear()
            self._postfix_n = 0
        if step % self.log_every == 0:
            self.flush_window()

    def flush_window(self) -> None:
        """Write the window accumulated so far (if any) at the last optimizer step seen."""
        if not self.enabled or not self._count:
            return
        step, lr = self._step, self._lr
        if self.writer is not None:
            s, n = self._sums, self._count
            images = max(s["images"], 1.0)
            fixed = {"task_loss", "matched", "matched_iou_sum", "images", "data_wait", "step"}
            self.writer.add_scalar("train/task_loss", s["task_loss"] / n, step)
            for key in sorted(set(s) - fixed):
                self.writer.add_scalar(f"train/{key}", s[key] / n, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/matched_per_image", s["matched"] / images, step)
            if s["matched"]:
                self.writer.add_scalar(
                    "train/matched_iou", s["matched_iou_sum"] / s["matched"], step
                )
            self.writer.add_scalar("time/data_wait", s["data_wait"] / n, step)
            self.writer.add_scalar("time/step", s["step"] / n, step)
            seconds = s["data_wait"] + s["step"]
            self.writer.add_scalar("time/images_per_s", s["images"] / max(seconds, 1e-9), step)
        self._sums.clear()
        self._count = 0

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        self.end_epoch()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
