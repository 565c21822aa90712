"""The training loop's progress bar."""

from __future__ import annotations

import re

from maskteacher.train.logger import TrainLogger


def test_progress_bar_shows_soft_term(capsys):
    logger = TrainLogger(None, log_every=1, enabled=True)
    logger.start_epoch(0, 1)
    logger.micro_batch(
        total=1.5, terms={"bce": 1.0, "soft": 0.25}, matched=4, matched_iou_sum=2.0,
        images=2, data_wait=0.1, step_time=0.4,
    )  # fmt: skip
    logger.optimizer_step(1, 1e-3)
    logger.close()
    postfix = capsys.readouterr().err.strip().split("\r")[-1]
    shown = dict(re.findall(r"(\w+)=([-+.\deE]+)", postfix))
    assert float(shown["soft"]) == 0.25 and float(shown["loss"]) == 1.5
    assert float(shown["matched"]) == 2.0  # matched pairs per image
