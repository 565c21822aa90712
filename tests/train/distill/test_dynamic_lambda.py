"""``distillation.dynamic_lambda`` on the origin's mobileSAM recipe: the validation plateau
scales lambda_coef, the next epoch trains with it, and the state survives a resume."""

from __future__ import annotations

import pytest
import torch
from origin_helpers import (
    TASK,
    kd_sum,
    load,
    origin_setup,
    precompute_teachers,
    scalars_by_step,
    task_sum,
    write_recipe,
)

from maskteacher.train import run as run_module
from maskteacher.train import train

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = origin_setup(tmp_path_factory.mktemp("dynamic"))
    precompute_teachers(out)
    return out


def test_plateau_scales_lambda_and_resumes(setup, monkeypatch):
    scores = iter([0.5, 0.4, 0.3, 0.6])  # validations after epochs 0..3
    monkeypatch.setattr(run_module, "validate", lambda *a, **k: next(scores))
    updates = {
        "train": {"epochs": 4, "loss_weights": dict(TASK)},
        "distillation": {
            "dynamic_lambda": {"enable_plateau_scheduler": True, "patience": 1, "factor": 0.5},
            "lambda_coef": 2.0,
        },
    }
    path = write_recipe(setup, "mobileSAM", **updates)
    cfg = load(path)
    assert cfg.distillation.encoder_patch.enable and cfg.distillation.lambda_coef == 2.0
    train(cfg, stop_after_steps=5)  # stops inside epoch 2, after its first step
    progress = torch.load(setup["root"] / "mobileSAM" / "last.pt", weights_only=True)["progress"]
    assert (progress["lambda_scale"], progress["lambda_wait"]) == (0.5, 0)
    cfg.train.resume = True
    train(cfg)
    tags = scalars_by_step(setup["root"] / "mobileSAM")
    # 0.5 improves (no best yet): 1; 0.4, 0.3 plateau (patience 1): 0.5, 0.25; 0.6 improves: 0.5
    assert tags["distill/lambda_scale"] == {2: 1.0, 4: 0.5, 6: 0.25, 8: 0.5}
    scale_of_epoch = [1.0, 1.0, 0.5, 0.25]
    for step in range(1, 9):
        scale = 2.0 * scale_of_epoch[(step - 1) // 2]
        want = task_sum(tags, step) + kd_sum(tags, step, scale)
        assert tags["train/task_loss"][step] == pytest.approx(want, rel=1e-5), step
