"""maskteacher precompute end to end (in process): cache content, header, resume, store flags,
failures, mismatches, --verify, --teacher, --limit, job arrays + cache merge."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
from precompute_helpers import (
    GEN,
    IMAGE_SIZE,
    TEACHER,
    assert_same_content,
    cache_content,
    make_teacher,
    run_cli,
    write_config,
)

from maskteacher.cache_format import logits_to_float, open_cache
from maskteacher.cache_format.verify import verify_cache
from maskteacher.config import load_config
from maskteacher.data import masks_to_lowres, open_dataset, to_model_input
from maskteacher.data.dataset import BaseDataset
from maskteacher.models import sha256_file
from maskteacher.models.everything import generate_everything
from maskteacher.precompute import GenerationParams, PrecomputeJob, run_precompute
from maskteacher.precompute.verify import verify_with_teacher


def test_cache_holds_the_generator_output_for_every_image(
    reference_cache, sample_root, val_root, teacher_ckpt
):
    report = verify_cache(reference_cache, progress=False)
    assert report.ok and report.images == 9, report.problems
    reader = open_cache(reference_cache)
    header = reader.header
    assert header.teacher_type == TEACHER and header.image_size == IMAGE_SIZE
    assert header.checkpoint_sha256 == sha256_file(teacher_ckpt)
    assert header.params["points_per_side"] == GEN["points_per_side"]
    assert header.params["pred_iou_thresh"] == GEN["pred_iou_thresh"]
    assert "points_per_batch" not in header.params
    assert set(header.fingerprints) == {"train", "val"}
    model = make_teacher(0)
    total = 0
    for split, root in (("train", sample_root), ("val", val_root)):
        dataset = open_dataset(root)
        assert header.dataset_roots[split] == str(root.resolve())
        samples = [dataset[i] for i in range(len(dataset))]
        for start in range(0, len(samples), 2):  # the job's batches: 2 images, within a shard
            batch = samples[start : start + 2]
            inputs = [to_model_input(s.image, IMAGE_SIZE) for s in batch]
            wants = generate_everything(
                model,
                torch.stack([x for x, _ in inputs]),
                [hw for _, hw in inputs],
                [s.orig_hw for s in batch],
                **GEN,
            )
            for k, (sample, want, (_, hw)) in enumerate(zip(batch, wants, inputs)):
                rec = reader[reader.index_of(sample.image_id, split)]
                assert rec.num_masks == len(want) > 0
                got = logits_to_float(rec.teacher_logits, header.codec)
                assert np.abs(got - want.logits.clamp(-12, 12).numpy()).max() <= 12 / 254 + 1e-6
                for name in ("points", "iou", "stability", "boxes"):
                    np.testing.assert_array_equal(
                        getattr(rec, f"teacher_{name}"), getattr(want, name).numpy()
                    )
                gt = masks_to_lowres(sample.masks, sample.orig_hw, IMAGE_SIZE).numpy()
                np.testing.assert_array_equal(rec.gt_masks, gt)
                assert tuple(rec.input_hw) == hw and tuple(rec.orig_hw) == sample.orig_hw
                path = dataset.image_path(start + k)
                assert (root / rec.source).resolve() == path.resolve()
                total += 1
    assert total == 9


def test_rerun_skips_finished_images(
    reference_cache, tmp_path, sample_root, val_root, teacher_ckpt
):
    copy = tmp_path / "cache"
    shutil.copytree(reference_cache, copy)
    config = write_config(tmp_path, train=sample_root, val=val_root, checkpoint=teacher_ckpt)
    job = PrecomputeJob.from_config(load_config(config), progress=False)
    summary = run_precompute(job)
    assert (summary.planned, summary.cached_before, summary.written) == (9, 9, 0)
    assert summary.exit_code == 0 and summary.manifest_images == 9
    assert_same_content(cache_content(copy), cache_content(reference_cache), code_tol=0)


def test_store_embedding_and_tokens_round_trip(tmp_path, sample_root, teacher_ckpt):
    config = write_config(
        tmp_path,
        train=sample_root,
        checkpoint=teacher_ckpt,
        precompute={"store": {"embedding": True, "tokens": True}},
    )
    assert run_cli(config, "--limit", 2) == 0
    reader = open_cache(tmp_path / "cache")
    assert reader.header.store.embedding and reader.header.store.tokens
    model = make_teacher(0)
    dataset = open_dataset(sample_root)
    for i in range(2):
        sample = dataset[i]
        x, hw = to_model_input(sample.image, IMAGE_SIZE)
        (want,) = generate_everything(
            model, x[None], [hw], [sample.orig_hw], return_embedding=True, return_tokens=True, **GEN
        )
        rec = reader[reader.index_of(sample.image_id)]
        assert rec.embedding.dtype == np.float16 and rec.embedding.shape == (64, 8, 8)
        np.testing.assert_allclose(rec.embedding, want.embedding.numpy(), rtol=2e-3, atol=2e-3)
        assert rec.tokens.shape == (len(want), 64)
        np.testing.assert_allclose(rec.tokens, want.tokens.numpy(), rtol=2e-3, atol=2e-3)


def test_ground_truth_only_cache(tmp_path, sample_root):
    """store.teacher false: no teacher masks, ground truth only (no checkpoint needed)."""
    config = write_config(
        tmp_path, train=sample_root, checkpoint=None, precompute={"store": {"teacher": False}}
    )
    assert run_cli(config) == 0
    reader = open_cache(tmp_path / "cache")
    assert not reader.header.store.teacher
    assert reader.header.checkpoint_sha256.startswith("weights:")
    assert all(reader[i].num_masks == 0 and reader[i].num_gt > 0 for i in range(len(reader)))


def test_random_teacher_is_identified_by_its_weights(tmp_path, sample_root):
    config = write_config(tmp_path, train=sample_root, checkpoint=None)
    assert run_cli(config, "--limit", 2) == 0
    sha = open_cache(tmp_path / "cache").header.checkpoint_sha256
    assert sha.startswith("weights:") and len(sha) == len("weights:") + 64
    assert run_cli(config) == 0  # the same seeded weights: the cache is resumed, not refused
    assert len(open_cache(tmp_path / "cache")) == 6


def test_other_parameters_or_checkpoint_are_refused(
    reference_cache, tmp_path, sample_root, val_root, teacher_ckpt, other_ckpt, capsys
):
    shutil.copytree(reference_cache, tmp_path / "cache")
    config = write_config(tmp_path, train=sample_root, val=val_root, checkpoint=teacher_ckpt)
    assert run_cli(config, "--set", "precompute.points_per_side=7") == 2
    err = capsys.readouterr().err
    assert "made with precompute.points_per_side = 6, but this run has 7" in err
    assert len(err.strip().splitlines()) == 1
    assert run_cli(config, "--set", "precompute.codec=fp16") == 2
    assert "precompute.codec = 'int8'" in capsys.readouterr().err
    assert run_cli(config, "--set", f"mask_teacher.checkpoint_path={other_ckpt}") == 2
    assert "the teacher checkpoint's sha256" in capsys.readouterr().err
    assert_same_content(
        cache_content(tmp_path / "cache"), cache_content(reference_cache), code_tol=0
    )


def test_unreadable_image_is_recorded_and_sets_the_exit_code(tmp_path, sample_root, teacher_ckpt):
    data = tmp_path / "data"
    shutil.copytree(sample_root, data)
    broken = data / "image" / "sample_0002.png"
    broken.write_bytes(broken.read_bytes()[:120])  # header intact, pixel data cut
    config = write_config(tmp_path, train=data, checkpoint=teacher_ckpt)
    assert run_cli(config) == 1  # 1 of 6 > max_failed_fraction 0.01
    manifest = open_cache(tmp_path / "cache").manifest
    assert manifest.images == 5
    (failure,) = manifest.failures
    assert failure.image_id == "sample_0002" and "sample_0002.png" in failure.reason
    # a looser threshold: the failed image is retried, fails again, the run passes
    assert run_cli(config, "--set", "precompute.max_failed_fraction=0.5") == 0
    assert len(open_cache(tmp_path / "cache").manifest.failures) == 1


def test_failed_image_is_retried_on_resume(tmp_path, sample_root, teacher_ckpt, monkeypatch):
    """A transient failure: the next run writes the image and the manifest forgets the failure."""
    config = write_config(
        tmp_path,
        train=sample_root,
        checkpoint=teacher_ckpt,
        precompute={"max_failed_fraction": 0.5},
    )
    original = BaseDataset.__getitem__

    def flaky(self, index):
        if self.image_ids[index] == "sample_0003":
            raise OSError("stale file handle")
        return original(self, index)

    monkeypatch.setattr(BaseDataset, "__getitem__", flaky)
    assert run_cli(config) == 0
    assert [f.image_id for f in open_cache(tmp_path / "cache").manifest.failures] == ["sample_0003"]
    monkeypatch.setattr(BaseDataset, "__getitem__", original)
    assert run_cli(config) == 0
    reader = open_cache(tmp_path / "cache")
    assert len(reader) == 6 and not reader.manifest.failures
    assert verify_cache(tmp_path / "cache", progress=False).ok
    assert any(s.path.endswith("train-000001-01.zarr") for s in reader.manifest.shards)


def test_verify_detects_a_cache_of_another_checkpoint(
    reference_cache, tmp_path, sample_root, val_root, teacher_ckpt, other_ckpt, capsys
):
    datasets = {"train": open_dataset(sample_root), "val": open_dataset(val_root)}
    params = GenerationParams(**GEN)
    right = verify_with_teacher(
        str(reference_cache), make_teacher(0), datasets, count=3, generation=params
    )
    assert right.ok and len(right.checks) == 3 and right.max_diff <= right.bound
    wrong = verify_with_teacher(
        str(reference_cache), make_teacher(1), datasets, count=3, generation=params
    )
    assert not wrong.ok and wrong.max_diff > 1.0
    # through the CLI: a cache whose header claims checkpoint B but holds checkpoint A's output
    cache = tmp_path / "cache"
    shutil.copytree(reference_cache, cache)
    sha_b = sha256_file(other_ckpt)
    for name in ("cache_header.json", "manifest.json"):
        doc = json.loads((cache / name).read_text())
        doc["teacher"]["checkpoint_sha256"] = sha_b
        (cache / name).write_text(json.dumps(doc))
    config = write_config(tmp_path, train=sample_root, val=val_root, checkpoint=other_ckpt)
    assert run_cli(config, "--verify", 2) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "0 images written, 9 already cached" in out
    config = write_config(tmp_path, train=sample_root, val=val_root, checkpoint=teacher_ckpt)
    assert run_cli(config, "--verify", 2, "--output", reference_cache) == 0
    assert ": OK" in capsys.readouterr().out


def test_teacher_entry_writes_its_own_cache(tmp_path, sample_root, teacher_ckpt, capsys):
    entry = {"name": "feat", "type": TEACHER, "checkpoint": str(teacher_ckpt)}
    entry["cache_path"] = str(tmp_path / "feat_cache")
    config = write_config(
        tmp_path,
        train=sample_root,
        checkpoint=None,
        precompute={"store": {"embedding": True}},
        extra={"teachers": [entry]},
    )
    assert run_cli(config, "--teacher", "feat", "--limit", 2) == 0
    reader = open_cache(tmp_path / "feat_cache")
    assert reader.header.checkpoint_sha256 == sha256_file(teacher_ckpt)
    assert len(reader) == 2 and reader[0].embedding is not None
    assert not (tmp_path / "cache").exists()
    assert run_cli(config, "--teacher", "nope") == 2
    assert "no teachers entry" in capsys.readouterr().err


def test_limit_and_split(tmp_path, sample_root, val_root, teacher_ckpt):
    config = write_config(tmp_path, train=sample_root, val=val_root, checkpoint=teacher_ckpt)
    assert run_cli(config, "--split", "val", "--limit", 2) == 0
    reader = open_cache(tmp_path / "cache")
    assert sorted(reader.image_ids) == ["sample_0000", "sample_0001"]
    assert {reader[i].split for i in range(len(reader))} == {"val"}


def test_job_array_outputs_merge_into_the_single_run_cache(
    reference_cache, tmp_path, sample_root, val_root, teacher_ckpt
):
    from maskteacher.cli import main

    config = write_config(tmp_path, train=sample_root, val=val_root, checkpoint=teacher_ckpt)
    parts = []
    for task in range(3):
        out = tmp_path / f"task{task}"
        assert run_cli(config, "--num-shards", 3, "--shard-index", task, "--output", out) == 0
        parts.append(out)
    # every planned shard was written by exactly one task
    names = [s.path for p in parts for s in open_cache(p).manifest.shards]
    assert len(names) == len(set(names)) == 5  # train: 3 shards of 2, val: 2 shards
    assert main(["cache", "merge", str(tmp_path / "merged"), *map(str, parts)]) == 0
    assert verify_cache(tmp_path / "merged", progress=False).ok
    assert_same_content(cache_content(tmp_path / "merged"), cache_content(reference_cache))


def test_job_array_tasks_can_share_one_cache_folder(
    reference_cache, tmp_path, sample_root, val_root, teacher_ckpt
):
    config = write_config(tmp_path, train=sample_root, val=val_root, checkpoint=teacher_ckpt)
    for task in (1, 0):
        assert run_cli(config, "--num-shards", 2, "--shard-index", task) == 0
    assert verify_cache(tmp_path / "cache", progress=False).ok
    assert_same_content(cache_content(tmp_path / "cache"), cache_content(reference_cache))


def test_bad_command_lines_are_one_line_errors(tmp_path, sample_root, capsys):
    config = write_config(tmp_path, train=sample_root, checkpoint=None)
    assert run_cli(config, "--num-shards", 2, "--shard-index", 2) == 2
    assert "--shard-index" in capsys.readouterr().err
    assert run_cli(config, "--set", "mask_teacher.cache_path=null") == 2
    assert "mask_teacher.cache_path is not set" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run_cli(config, "--set", "precompute.device=cuda") == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert run_cli(config, "--set", "precompute.device=tpu") == 2
    assert "precompute.device" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache" / "shards").iterdir())


def test_coco_sources_let_cache_view_find_the_images(tmp_path, teacher_ckpt, capsys):
    from maskteacher.cli import main
    from maskteacher.data import make_sample

    data = make_sample(tmp_path / "coco", format="coco", images=2, seed=3, size_range=(64, 100))
    config = write_config(tmp_path, train=data, checkpoint=teacher_ckpt)
    assert run_cli(config, "--set", "dataset.format=coco") == 0
    reader = open_cache(tmp_path / "cache")
    dataset = open_dataset(data, "coco")
    assert reader.header.dataset_roots["train"] == str(dataset.image_dir.resolve())
    assert reader[0].source == dataset.image_path(0).name
    out = tmp_path / "view.png"
    assert (
        main(["cache", "view", str(tmp_path / "cache"), reader.image_ids[0], "--out", str(out)])
        == 0
    )
    assert out.stat().st_size > 0 and "teacher masks" in capsys.readouterr().out


def test_teacher_checkpoint_errors_name_the_teacher_keys(tmp_path, sample_root, capsys):
    """A broken SAM-HQ-style file (two HQ decoder keys, of other shapes: detected as SAM-HQ, so
    the SAM-HQ teacher is built and misses the rest) or another backbone's file for the teacher:
    one line naming mask_teacher's keys, and with mask_teacher.strict: false the file loads."""
    state = make_teacher(0).state_dict()
    state["mask_decoder.hf_token.weight"] = torch.zeros(1, 8)
    state["mask_decoder.hf_mlp.layers.0.weight"] = torch.zeros(8, 8)
    hq = tmp_path / "sam_hq_style.pth"
    torch.save(state, hq)
    config = write_config(tmp_path, train=sample_root, checkpoint=hq)
    assert run_cli(config, "--limit", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match model vit_b_tiny (as vit_b_tiny_hq)" in err[0]
    assert "missing (mask_decoder.hf_mlp.*" in err[0] and "mask_teacher.strict: false" in err[0]
    assert run_cli(config, "--limit", "1", "--set", "mask_teacher.strict=false") == 0
    capsys.readouterr()
    other = tmp_path / "vit_t.pth"
    torch.save(make_teacher(0, "vit_t_tiny").state_dict(), other)
    config = write_config(tmp_path, train=sample_root, checkpoint=other, cache="cache2")
    assert run_cli(config) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(vit_t_tiny); mask_teacher.teacher_type is vit_b_tiny" in err[0]
