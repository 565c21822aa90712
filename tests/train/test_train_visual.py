"""The trainer's ``visual`` section: overlays of validation images every N epochs."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from train_helpers import tiny_config, write_cache

from maskteacher.cli import main as cli_main
from maskteacher.data import open_dataset
from maskteacher.train.run import train
from maskteacher.viz.panels import TITLE_HEIGHT


def _epochs(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_overlays_every_n_epochs_with_teacher_panel(sample_data, tmp_path):
    cache = write_cache(tmp_path / "cache", sample_data, teacher=True)
    cfg, _ = tiny_config(
        tmp_path,
        sample_data,
        dataset={"val_dataset": str(sample_data["val"])},
        train={"epochs": 4},
        mask_teacher={"cache_path": str(cache)},
        visual={"status": True, "save_every_n_epochs": 2, "num_images": 1, "IOU_threshold": 0.0},
    )
    train(cfg)
    folder = tmp_path / "run" / "visual"
    assert _epochs(folder) == ["epoch_001", "epoch_003"]
    val = open_dataset(sample_data["val"])
    first = val[0]
    pngs = sorted((folder / "epoch_003").glob("*.png"))
    assert [p.stem for p in pngs] == [first.image_id]  # num_images 1: the first image only
    picture = np.asarray(Image.open(pngs[0]))
    h, w = first.image.shape[:2]
    # image | ground truth | student | teacher, each the original size under its caption
    assert picture.shape[:2] == (h + TITLE_HEIGHT, 4 * w + 3 * 4)  # 4 panels, 4-pixel gaps
    # the first panel is the image itself
    np.testing.assert_array_equal(picture[TITLE_HEIGHT:, :w, :3], first.image)


def test_overlays_off_by_default_and_save_path(sample_data, tmp_path):
    cfg, _ = tiny_config(tmp_path, sample_data, dataset={"val_dataset": str(sample_data["val"])})
    train(cfg)
    assert not (tmp_path / "run" / "visual").exists()
    out = tmp_path / "pictures"
    cfg, _ = tiny_config(
        tmp_path,
        sample_data,
        dataset={"val_dataset": str(sample_data["val"])},
        model={"save_path": str(tmp_path / "run2")},
        visual={"status": True, "save_path": str(out), "num_images": 5},
    )
    train(cfg)
    assert _epochs(out) == ["epoch_000"]
    val = open_dataset(sample_data["val"])
    pngs = sorted((out / "epoch_000").glob("*.png"))
    assert len(pngs) == len(val)  # num_images above the dataset's size: every image
    h, w = val[0].image.shape[:2]
    picture = np.asarray(Image.open(out / "epoch_000" / f"{val[0].image_id}.png"))
    assert picture.shape[:2] == (h + TITLE_HEIGHT, 3 * w + 2 * 4)  # no cache: no teacher panel


def test_overlays_do_not_change_training(sample_data, tmp_path):
    """Drawing uses no random numbers and restores train mode: the same losses and weights."""
    results = []
    for status in (False, True):
        cfg, _ = tiny_config(
            tmp_path,
            sample_data,
            name=f"cfg_{status}.yaml",
            dataset={"val_dataset": str(sample_data["val"])},
            model={"save_path": str(tmp_path / f"run_{status}")},
            train={"epochs": 2},
            visual={"status": status},
        )
        results.append(train(cfg).losses)
    assert results[0] == results[1]
    a = torch.load(tmp_path / "run_False" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "run_True" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_overlays_with_a_train_only_cache_have_no_teacher_panel(sample_data, tmp_path):
    cache = write_cache(tmp_path / "cache", {"train": sample_data["train"]}, teacher=True)
    cfg, _ = tiny_config(
        tmp_path,
        sample_data,
        dataset={"val_dataset": str(sample_data["val"])},
        mask_teacher={"cache_path": str(cache)},
        visual={"status": True, "num_images": 1},
    )
    train(cfg)
    val = open_dataset(sample_data["val"])
    h, w = val[0].image.shape[:2]
    picture = tmp_path / "run" / "visual" / "epoch_000" / f"{val[0].image_id}.png"
    assert np.asarray(Image.open(picture)).shape[:2] == (h + TITLE_HEIGHT, 3 * w + 2 * 4)


def test_visual_without_a_validation_set_is_one_line(sample_data, tmp_path, capsys):
    _, path = tiny_config(tmp_path, sample_data, load=False, visual={"status": True})
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset.val_dataset is not set" in err[0]
    assert not (tmp_path / "run").exists()


def test_single_mode_pictures_show_the_everything_mode_student(sample_data, tmp_path):
    """The origin's configs (single mode, visual.status: true) draw the student's
    everything-mode masks, as validation measures them."""
    cfg, _ = tiny_config(
        tmp_path,
        sample_data,
        dataset={"val_dataset": str(sample_data["val"]), "mode": "single"},
        visual={"status": True, "num_images": 2},
    )
    train(cfg)
    val = open_dataset(sample_data["val"])
    folder = tmp_path / "run" / "visual" / "epoch_000"
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(val.image_ids[:2])
