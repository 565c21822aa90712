"""The trainer refuses or stops with one line instead of training on wrong data or leaving a
mess (issue 11): non-finite losses, the run-folder lock and checks, unwritable outputs, bad
resume checkpoints, ``mask_teacher.enable: false`` with an unusable cache, short-run logs."""

from __future__ import annotations

import errno

import pytest
import torch
from train_helpers import IMAGE_SIZE, tiny_config, write_cache

from maskteacher.cli import main as cli_main
from maskteacher.errors import UserError
from maskteacher.train.logger import TrainLogger
from maskteacher.train.run import train
from maskteacher.train.run_folder import RunLock


def _scalars(folder, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ----------------------------------------------------------------------------- non-finite


def test_a_bad_learning_rate_stops_with_one_line_and_exports_nothing(sample_data, tmp_path, capsys):
    """lr 1e30: the first update blows the weights up, the second micro-batch's loss is not
    finite -> exit 2, one line naming the step and the terms, no checkpoint, no export."""
    _, path = tiny_config(
        tmp_path, sample_data, train={"batch_size": 1, "lr": 1e30, "grad_clip": None}
    )
    code = cli_main(["train", str(path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("maskteacher: error:")]
    assert code == 2 and "Traceback" not in err
    assert (
        len(lines) == 1 and "the loss is not finite at epoch 0, after optimizer step 1" in lines[0]
    )
    assert "total=" in lines[0] and "cls=" in lines[0]
    run = tmp_path / "run"
    assert not (run / "last.pt").exists() and not (run / "student_official.pth").exists()


def test_non_finite_loss_keeps_the_last_good_checkpoint(sample_data, tmp_path, monkeypatch):
    from maskteacher.train.supervision.gt import GTSupervision

    original = GTSupervision.__call__

    def nan_in_epoch_1(self, preds, batch, ctx):
        out = original(self, preds, batch, ctx)
        if ctx.epoch == 1:
            out.terms["dice"] = out.terms["dice"] * float("nan")
        return out

    monkeypatch.setattr(GTSupervision, "__call__", nan_in_epoch_1)
    cfg, _ = tiny_config(tmp_path, sample_data, train={"epochs": 3})
    with pytest.raises(UserError, match="not finite at epoch 1.*dice=nan"):
        train(cfg)
    run = tmp_path / "run"
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["progress"]["epoch"] == 1  # written after epoch 0, never overwritten
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values())
    assert not (run / "student_official.pth").exists()


def test_nan_student_checkpoint_is_refused_at_the_first_step(sample_data, tmp_path):
    from maskteacher.models import build_sam

    model = build_sam("vit_t_tiny", image_size=IMAGE_SIZE)
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}  # fmt: skip
    torch.save(state, tmp_path / "nan.pt")
    cfg, _ = tiny_config(tmp_path, sample_data, model={"checkpoint_path": str(tmp_path / "nan.pt")})
    with pytest.raises(UserError, match="not finite at epoch 0, after optimizer step 0"):
        train(cfg)
    assert not (tmp_path / "run" / "student_official.pth").exists()
    assert not (tmp_path / "run" / "last.pt").exists()


def test_an_error_inside_a_dataloader_worker_is_the_same_one_line(tmp_path, capsys):
    """A corrupt image read by a DataLoader worker: one line as with num_workers 0, not torch's
    "Caught UserError in DataLoader worker process 0" and the worker's traceback."""
    from train_helpers import make_data

    data = {"train": make_data(tmp_path / "train", images=2, seed=5)}
    image = sorted((data["train"] / "image").iterdir())[1]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # header fine, pixels cut
    lines = {}
    for workers in (0, 1):
        _, path = tiny_config(
            tmp_path, data, name=f"w{workers}.yaml", load=False,
            dataset={"num_workers": workers}, model={"save_path": str(tmp_path / f"run{workers}")},
        )  # fmt: skip
        assert cli_main(["train", str(path)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "Caught" not in err and "worker process" not in err
        lines[workers] = [x for x in err.splitlines() if x.startswith("maskteacher: error:")]
    assert len(lines[1]) == 1 and lines[1] == lines[0]
    assert image.name in lines[1][0]


# ----------------------------------------------------------------------------- run folder


def test_a_second_run_into_the_same_folder_is_refused(sample_data, tmp_path):
    cfg, _ = tiny_config(tmp_path, sample_data)
    holder = RunLock(tmp_path / "run")
    holder.acquire()  # another run holds the folder
    try:
        with pytest.raises(UserError, match=r"in use by another training run \(pid \d+\)"):
            train(cfg)
    finally:
        holder.release()
    assert train(cfg).epochs_done == 1  # free again once the first run ends


def test_save_path_inside_the_dataset_folder_is_refused(sample_data, tmp_path):
    inside = sample_data["train"] / "runs" / "a"
    cfg, _ = tiny_config(tmp_path, sample_data, model={"save_path": str(inside)})
    with pytest.raises(UserError, match="is inside the dataset folder"):
        train(cfg)
    assert not (sample_data["train"] / "runs").exists()


def test_save_path_that_is_a_file_is_refused(sample_data, tmp_path):
    (tmp_path / "afile").write_text("x")
    cfg, _ = tiny_config(tmp_path, sample_data, model={"save_path": str(tmp_path / "afile")})
    with pytest.raises(UserError, match="is a file; expected a folder"):
        train(cfg)


@pytest.mark.parametrize("kind", ["parent_is_file", "name_too_long"])
def test_unwritable_save_path_is_one_line(kind, sample_data, tmp_path):
    if kind == "parent_is_file":
        (tmp_path / "afile").write_text("x")
        save = tmp_path / "afile" / "run"
    else:
        save = tmp_path / ("r" * 300)
    cfg, _ = tiny_config(tmp_path, sample_data, model={"save_path": str(save)})
    with pytest.raises(UserError, match="cannot write the run folder"):
        train(cfg)


def test_disk_full_during_a_checkpoint_save_is_one_line(sample_data, tmp_path, monkeypatch):
    import maskteacher.train.run as run_module

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_module, "atomic_save", full)
    cfg, _ = tiny_config(tmp_path, sample_data)
    with pytest.raises(UserError, match="cannot write the checkpoint .*last.pt: No space left"):
        train(cfg)


def test_missing_resume_file_creates_nothing(sample_data, tmp_path):
    cfg, _ = tiny_config(tmp_path, sample_data, train={"resume": str(tmp_path / "nope.pt")})
    with pytest.raises(UserError, match="not found"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_stale_temporary_checkpoints_are_removed_on_start(sample_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".last.pt.tmp-999999"
    stale.write_bytes(b"half a checkpoint")
    cfg, _ = tiny_config(tmp_path, sample_data)
    train(cfg)
    assert not stale.exists()
    assert (run / "last.pt").is_file()


# ----------------------------------------------------------------------------- resume


def _trained(sample_data, tmp_path):
    cfg, _ = tiny_config(tmp_path, sample_data)
    train(cfg)
    return tmp_path / "run" / "last.pt"


def test_resume_checkpoint_missing_fields_is_one_line(sample_data, tmp_path):
    last = _trained(sample_data, tmp_path)
    ckpt = torch.load(last, weights_only=True)
    del ckpt["optimizer"], ckpt["cache_id"]
    torch.save(ckpt, tmp_path / "partial.pt")
    cfg, _ = tiny_config(
        tmp_path, sample_data, name="b.yaml", train={"resume": str(tmp_path / "partial.pt")}
    )
    with pytest.raises(UserError, match="lacks cache_id, optimizer"):
        train(cfg)


def test_resume_checkpoint_of_another_model_is_one_line(sample_data, tmp_path):
    last = _trained(sample_data, tmp_path)
    ckpt = torch.load(last, weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if "mask_decoder" not in k}
    torch.save(ckpt, tmp_path / "other.pt")
    cfg, _ = tiny_config(
        tmp_path, sample_data, name="b.yaml", train={"resume": str(tmp_path / "other.pt")}
    )
    with pytest.raises(UserError, match="do not fit model.type 'vit_t_tiny'"):
        train(cfg)


# ----------------------------------------------------------------------------- enable: false


@pytest.mark.parametrize("cache", ["missing", "other_size"])
def test_disabled_mask_teacher_reads_the_dataset_when_the_cache_is_unusable(
    cache, sample_data, tmp_path
):
    """mask_teacher.enable: false trains exactly as without a cache when the cache is missing or
    does not match -- never an error."""
    path = tmp_path / "cache"
    if cache == "other_size":
        write_cache(path, {"train": sample_data["train"]}, image_size=IMAGE_SIZE * 2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base, _ = tiny_config(tmp_path / "a", sample_data, train={"epochs": 2})
    with_cache, _ = tiny_config(
        tmp_path / "b",
        sample_data,
        train={"epochs": 2},
        mask_teacher={"enable": False, "cache_path": str(path)},
    )
    assert train(with_cache).losses == train(base).losses


# ----------------------------------------------------------------------------- stale cache


def test_a_cache_made_before_an_annotation_was_edited_is_never_trained_on(tmp_path, caplog):
    """The cache holds the old ground truth: after a mask file changes, a run that needs the
    cache's teacher outputs is refused naming why; a GT-only run reads the edited dataset."""
    import logging

    import numpy as np
    from PIL import Image
    from train_helpers import make_data

    data = {"train": make_data(tmp_path / "train", images=2, seed=4)}
    cache = write_cache(tmp_path / "cache", data, teacher=True)
    mask = sorted((data["train"] / "mask").rglob("*.png"))[0]
    pixels = np.asarray(Image.open(mask)).copy()
    pixels[: pixels.shape[0] // 2] = 0  # the object shrinks; the file keeps its size on disk
    Image.fromarray(pixels).save(mask)
    needs, _ = tiny_config(
        tmp_path, data, train={"prompt_source": "teacher"}, mask_teacher={"cache_path": str(cache)}
    )
    with pytest.raises(UserError, match="dataset changed since the cache was made"):
        train(needs)
    gt_only, _ = tiny_config(tmp_path, data, name="b.yaml", mask_teacher={"cache_path": str(cache)})
    reference, _ = tiny_config(
        tmp_path, data, name="c.yaml", model={"save_path": str(tmp_path / "c")}
    )
    with caplog.at_level(logging.WARNING):
        losses = train(gt_only).losses
    assert "reading it from the dataset" in caplog.text
    assert losses == train(reference).losses


# ----------------------------------------------------------------------------- logs


def test_short_runs_and_epoch_ends_are_logged(sample_data, tmp_path):
    """log_every 3 with 2 optimizer steps per epoch: the partial windows at each epoch's end are
    written (steps 2 and 4), the due one too (step 3)."""
    cfg, _ = tiny_config(
        tmp_path, sample_data, train={"epochs": 2, "batch_size": 1, "log_every": 3}
    )
    train(cfg)
    steps = [s for s, _ in _scalars(tmp_path / "run" / "tensorboard", "train/task_loss")]
    assert steps == [2, 3, 4]


def test_a_run_shorter_than_the_window_logs_its_losses(sample_data, tmp_path):
    cfg, _ = tiny_config(tmp_path, sample_data, train={"epochs": 1, "log_every": 10})
    result = train(cfg)
    logged = _scalars(tmp_path / "run" / "tensorboard", "train/task_loss")
    assert len(logged) == 1
    assert logged[0][1] == pytest.approx(sum(result.losses) / len(result.losses), rel=1e-6)


def test_progress_bar_shows_small_soft_losses_with_significant_digits():
    shown = {}

    class Bar:
        def update(self, n):
            pass

        def set_postfix(self, **kwargs):
            shown.update(kwargs)

        def close(self):
            pass

    logger = TrainLogger(None, log_every=1, enabled=True)
    logger._bar = Bar()
    logger.micro_batch(total=0.5, terms={"soft": 1.234e-4}, matched=2, matched_iou_sum=1.0,
                       images=1, data_wait=0.0, step_time=0.1)  # fmt: skip
    logger.optimizer_step(1, 1e-3)
    assert shown["soft"] == "0.0001234"
    assert shown["loss"] == "0.5"


# ----------------------------------------------------------------------------- empty teacher


@pytest.mark.parametrize("method", ["replace_gt", "dual_supervision"])
def test_a_cache_whose_teacher_kept_nothing_is_refused(method, sample_data, tmp_path):
    """Thresholds too strict for the teacher: most cached images have no teacher mask and the
    mask-teacher method would train on nothing -- refused, unless explicitly allowed."""
    from mask_teacher_helpers import write_teacher_cache

    from maskteacher.data import open_dataset

    ids = open_dataset(sample_data["train"]).image_ids
    cache = write_teacher_cache(
        tmp_path / "cache", {"train": sample_data["train"]}, empty_teacher=tuple(ids)
    )
    block = {
        "enable": True,
        "method": method,
        "cache_path": str(cache),
        "teacher_type": "vit_b_tiny",
    }
    cfg, _ = tiny_config(tmp_path, sample_data, mask_teacher=block)
    with pytest.raises(
        UserError, match=r"kept no mask on 100% of the 2 images.*allow_empty_teacher"
    ):
        train(cfg)
    assert not (tmp_path / "run").exists()
    allowed, _ = tiny_config(
        tmp_path, sample_data, name="b.yaml", mask_teacher={**block, "allow_empty_teacher": True}
    )
    assert train(allowed).epochs_done == 1
    # one empty image of two is not "most": trains without the override
    half = write_teacher_cache(
        tmp_path / "half", {"train": sample_data["train"]}, empty_teacher=(ids[0],)
    )
    cfg, _ = tiny_config(
        tmp_path, sample_data, name="c.yaml", mask_teacher={**block, "cache_path": str(half)},
        model={"save_path": str(tmp_path / "c")},
    )  # fmt: skip
    assert train(cfg).epochs_done == 1


def test_resume_path_rules(tmp_path, caplog):
    """train.resume: false -> none; true -> the folder's last.pt when it exists, else a fresh
    start (logged); a path -> that path (a missing one is refused when loaded, tested above)."""
    from maskteacher.train.run_folder import resume_path

    last = tmp_path / "last.pt"
    assert resume_path(False, last) is None
    with caplog.at_level("INFO", logger="maskteacher.train.run_folder"):
        assert resume_path(True, last) is None
    assert "starting fresh" in caplog.text
    last.write_bytes(b"x")
    assert resume_path(True, last) == last
    assert resume_path(False, last) is None
    assert resume_path(str(tmp_path / "other.pt"), last) == tmp_path / "other.pt"
