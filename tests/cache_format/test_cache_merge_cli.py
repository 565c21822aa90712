"""cache merge / inspect / view through the CLI entry point."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskteacher.cache_format import CacheError, open_cache, record_failure
from maskteacher.cache_format.merge import merge_caches
from maskteacher.cli import main


def _two_workers(tmp_path, write_cache, make_header, make_record, backend="zarr", **header_kw):
    rng = np.random.default_rng(1)
    a = tmp_path / "worker0"
    b = tmp_path / "worker1"
    write_cache(
        a,
        make_header(backend, **header_kw),
        {"rank0-00000": [make_record(rng, f"x{i}", n=i, m=1) for i in range(3)]},
    )
    write_cache(
        b,
        make_header(backend, **header_kw),
        {"rank1-00000": [make_record(rng, f"y{i}", n=2, m=i) for i in range(2)]},
    )
    return a, b


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_merge_workers_into_one_cache(
    tmp_path, write_cache, make_header, make_record, capsys, backend
):
    a, b = _two_workers(tmp_path, write_cache, make_header, make_record, backend)
    record_failure(b, "rank1", "broken.jpg", "train", "cannot decode")
    out = tmp_path / "merged"
    assert main(["cache", "merge", str(out), str(a), str(b)]) == 0
    assert "5 images in 2 shards" in capsys.readouterr().out
    reader = open_cache(out)
    assert sorted(reader.image_ids) == ["x0", "x1", "x2", "y0", "y1"]
    np.testing.assert_array_equal(reader["x2"].teacher_logits, open_cache(a)["x2"].teacher_logits)
    assert [f.image_id for f in reader.manifest.failures] == ["broken.jpg"]
    assert main(["cache", "verify", str(out), "--quiet"]) == 0
    # running it again changes nothing (already merged shards are recognised)
    assert main(["cache", "merge", str(out), str(a), str(b)]) == 0
    assert len(open_cache(out)) == 5


def test_merge_refuses_duplicates_and_mismatches(
    tmp_path, write_cache, make_header, make_record, capsys
):
    a, b = _two_workers(tmp_path, write_cache, make_header, make_record)
    rng = np.random.default_rng(2)
    dup = tmp_path / "dup"
    write_cache(dup, make_header(), {"rank9-00000": [make_record(rng, "x1", n=1, m=0)]})
    with pytest.raises(
        CacheError,
        match=r"image 'x1' \(train\) is in both .*worker0/shards/rank0-00000.zarr and .*dup",
    ):
        merge_caches(tmp_path / "m1", [a, dup])
    assert main(["cache", "merge", str(tmp_path / "m1"), str(a), str(dup)]) == 2
    assert "refusing to merge duplicates" in capsys.readouterr().err
    other = tmp_path / "other"
    write_cache(
        other,
        make_header(params={"points_per_side": 32, "pred_iou_thresh": 0.88}),
        {"z-00000": [make_record(rng, "z", n=1, m=0)]},
    )
    with pytest.raises(CacheError, match=r"params.points_per_side is 32 there but 8 here"):
        merge_caches(tmp_path / "m2", [a, other])
    assert not (tmp_path / "m2").exists()
    with pytest.raises(CacheError, match="not a cache"):
        merge_caches(tmp_path / "m3", [tmp_path])


def test_merge_unfinished_worker_folder_and_name_clash(
    tmp_path, write_cache, make_header, make_record
):
    from maskteacher.cache_format import ShardWriter, init_cache

    rng = np.random.default_rng(3)
    a = tmp_path / "a"
    b = tmp_path / "b"
    write_cache(a, make_header(), {"s-00000": [make_record(rng, "p", n=1, m=0)]})
    init_cache(b, make_header())
    with ShardWriter(b, "s-00000", split="train") as w:  # same shard name, no finalize
        w.add(make_record(rng, "q", n=1, m=0))
    manifest = merge_caches(tmp_path / "m", [a, b], link=False)
    assert sorted(s.path for s in manifest.shards) == [
        "shards/s-00000-m1.zarr",
        "shards/s-00000.zarr",
    ]
    assert sorted(open_cache(tmp_path / "m").image_ids) == ["p", "q"]


def test_inspect_text_and_json(small_cache, capsys):
    root, manifest, _ = small_cache
    record_failure(root, "w9", "gone", "train", "file missing")
    from maskteacher.cache_format import finalize

    finalize(root)
    assert main(["cache", "inspect", root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 5 and info["shards"] == 2
    assert info["masks_per_image"] == {"min": 0, "median": 3, "max": 9}
    assert info["gt_masks_per_image"] == {"min": 0, "median": 1, "max": 5}
    assert info["codec"] == {"name": "int8", "clip": 12.0, "zstd_level": 6}
    assert info["teacher"]["type"] == "vit_t" and info["params"]["points_per_side"] == 8
    assert info["bytes_per_image"] == pytest.approx(sum(s.bytes for s in manifest.shards) / 5)
    assert info["failed_images"] == [
        {"image_id": "gone", "split": "train", "reason": "file missing", "worker": "w9"}
    ]
    assert 0 < info["quantisation"]["max_err_inside_8"] < 0.05
    assert main(["cache", "inspect", root]) == 0
    text = capsys.readouterr().out
    assert "masks/image min 0, median 3, max 9" in text and "train/gone: file missing" in text
    assert main(["cache", "inspect", str(os.path.dirname(root))]) == 2


def _view_cache(tmp_path, write_cache, make_header, make_record):
    rng = np.random.default_rng(4)
    data = tmp_path / "images"
    (data / "sub").mkdir(parents=True)
    rec = make_record(rng, "pic", n=2, m=1, source="sub/pic.png")
    h, w = (int(v) for v in rec.orig_hw)
    Image.fromarray(np.full((h, w, 3), 40, np.uint8)).save(data / "sub" / "pic.png")
    low = 16
    rec.teacher_logits = np.full((2, low, low), -10.0, np.float32)
    rec.teacher_logits[0, :4, :4] = 10.0  # top-left corner of the model input frame
    rec.gt_masks = np.zeros((1, low, low), bool)
    rec.gt_masks[0, 4:12, 4:12] = True
    root = tmp_path / "cache"
    write_cache(root, make_header(dataset_roots={"train": str(data)}), {"s-00000": [rec]})
    return root, rec, data


def test_view_draws_teacher_masks_and_gt_outlines(
    tmp_path, write_cache, make_header, make_record, capsys
):
    root, rec, data = _view_cache(tmp_path, write_cache, make_header, make_record)
    out = tmp_path / "view.png"
    assert main(["cache", "view", str(root), "pic", "--out", str(out)]) == 0
    assert "2 teacher masks, 1 ground-truth outlines" in capsys.readouterr().out
    img = np.asarray(Image.open(out))
    h, w = (int(v) for v in rec.orig_hw)
    assert img.shape == (h, w, 3)
    assert (img[1, 1] != 40).any()  # teacher mask 0 coloured in the top-left corner
    assert (img == 255).all(axis=2).any()  # white ground-truth outline drawn somewhere
    assert (img[h - 1, w - 1] == 40).all()  # far corner untouched
    out2 = tmp_path / "view2.png"
    assert (
        main(
            [
                "cache",
                "view",
                str(root),
                "pic",
                "--out",
                str(out2),
                "--image",
                str(data / "sub" / "pic.png"),
            ]
        )
        == 0
    )
    assert (np.asarray(Image.open(out2)) == img).all()


def test_view_explains_a_missing_image(tmp_path, write_cache, make_header, make_record, capsys):
    root, rec, data = _view_cache(tmp_path, write_cache, make_header, make_record)
    os.unlink(data / "sub" / "pic.png")
    assert main(["cache", "view", str(root), "pic", "--out", str(tmp_path / "v.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pic.png does not exist; pass --image FILE" in err
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "small.png")
    assert (
        main(
            [
                "cache",
                "view",
                str(root),
                "pic",
                "--out",
                str(tmp_path / "v.png"),
                "--image",
                str(tmp_path / "small.png"),
            ]
        )
        == 2
    )
    assert "wrong --image" in capsys.readouterr().err
    assert main(["cache", "view", str(root), "nope", "--out", str(tmp_path / "v.png")]) == 2
    assert "not in the cache" in capsys.readouterr().err
    assert not (tmp_path / "v.png").exists()


def test_lowres_to_original_matches_segment_anything():
    torch = pytest.importorskip("torch")
    from segment_anything.modeling import Sam

    from maskteacher.cli.cache import lowres_to_original

    rng = np.random.default_rng(0)
    masks = rng.normal(size=(3, 16, 16)).astype(np.float32)

    class _Encoder:
        img_size = 64

    fake = type("FakeSam", (), {"image_encoder": _Encoder()})()
    want = Sam.postprocess_masks(fake, torch.from_numpy(masks)[:, None], (48, 64), (90, 120))[
        :, 0
    ].numpy()
    np.testing.assert_allclose(lowres_to_original(masks, 64, (48, 64), (90, 120)), want, atol=1e-5)


def test_merge_into_itself_finalizes_in_place(tmp_path, make_header, make_record, capsys):
    from maskteacher.cache_format import ShardWriter, init_cache

    root = tmp_path / "c"
    init_cache(root, make_header())
    with ShardWriter(root, "s-00000", split="train") as w:
        w.add(make_record(np.random.default_rng(0), "only", n=2, m=1))
    with pytest.raises(CacheError, match="unfinished.*cache merge"):
        open_cache(root)
    assert main(["cache", "merge", str(root), str(root)]) == 0
    assert open_cache(root).image_ids == ["only"]
    assert sorted(os.listdir(root / "shards")) == ["s-00000.json", "s-00000.zarr"]


def test_merge_copies_only_listed_files_and_never_follows_links_out(
    tmp_path, write_cache, make_header, make_record, capsys
):
    """Issue 11 item 10: a symlink in a source cache could copy files from outside the cache
    (a private key next to it) into the merged cache."""
    a, b = _two_workers(tmp_path, write_cache, make_header, make_record)
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "more.pem").write_text("PRIVATE KEY 2")
    shard = a / "shards" / "rank0-00000.zarr"
    os.symlink(secret, shard / "stolen")
    os.symlink(tmp_path / "keys", shard / "teacher_meta" / "keys")
    for copy in (False, True):
        out = tmp_path / f"merged-{copy}"
        argv = ["cache", "merge", str(out), str(a), str(b)] + (["--copy"] if copy else [])
        assert main(argv) == 0
        capsys.readouterr()
        for folder, dirs, names in os.walk(out):
            for name in dirs + names:
                path = os.path.join(folder, name)
                assert not os.path.islink(path)
                if os.path.isfile(path):
                    assert b"PRIVATE KEY" not in Path(path).read_bytes()
        assert main(["cache", "verify", str(out), "--quiet"]) == 0
        capsys.readouterr()
    report = json.loads(_json_out(["cache", "verify", str(a), "--json"], capsys, code=1))
    messages = {p["message"] for p in report["problems"]}
    assert "shards/rank0-00000.zarr/stolen is a symlink (a cache holds no links)" in messages
    assert (
        "shards/rank0-00000.zarr/teacher_meta/keys is a symlink (a cache holds no links)"
        in messages
    )
    # a listed file replaced by a link to the outside is refused, nothing is merged
    meta = shard / "teacher_meta" / "zarr.json"
    os.rename(meta, tmp_path / "meta.json")
    os.symlink(tmp_path / "meta.json", meta)
    with pytest.raises(CacheError, match="resolves outside the cache root"):
        merge_caches(tmp_path / "m3", [a, b])
    assert not any((tmp_path / "m3" / "shards").glob("*.zarr"))
    with pytest.raises(CacheError, match="resolves outside the cache root"):
        open_cache(a, verify_shards=True)["x0"]


def _json_out(argv, capsys, *, code=0):
    assert main(argv) == code
    return capsys.readouterr().out


def test_merge_refuses_an_output_inside_a_dataset_folder(
    tmp_path, write_cache, make_header, make_record
):
    rng = np.random.default_rng(5)
    data = tmp_path / "data"
    data.mkdir()
    write_cache(
        tmp_path / "a",
        make_header(dataset_roots={"train": str(data)}),
        {"s-00000": [make_record(rng, "p", n=1, m=0)]},
    )
    with pytest.raises(CacheError, match=r"inside the dataset folder .*data \(train\)"):
        merge_caches(data / "cache", [tmp_path / "a"])
    assert not (data / "cache").exists()


def test_view_refuses_to_overwrite_its_inputs(
    tmp_path, write_cache, make_header, make_record, capsys
):
    """Issue 11 item 9: ``cache view --out`` could overwrite the dataset image it draws."""
    root, rec, data = _view_cache(tmp_path, write_cache, make_header, make_record)
    image = data / "sub" / "pic.png"
    before = image.read_bytes()
    for out in (image, data / "other.png", root / "view.png"):
        assert main(["cache", "view", str(root), "pic", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("is the image being drawn" in err or "lies inside" in err)
    elsewhere = tmp_path / "copy.png"
    elsewhere.write_bytes(before)
    assert (
        main(
            ["cache", "view", str(root), "pic", "--out", str(elsewhere), "--image", str(elsewhere)]
        )
        == 2
    )
    assert "is the image being drawn" in capsys.readouterr().err
    assert image.read_bytes() == before and not (data / "other.png").exists()


def test_repair_keeps_one_copy_of_each_image(tmp_path, make_header, make_record, capsys):
    """Issue 11 item 9: two precompute runs at once left the same image in two shards, and
    finalize / train / merge refused the cache; ``cache repair`` fixes it."""
    from maskteacher.cache_format import ShardWriter, finalize, init_cache

    rng = np.random.default_rng(6)
    root = tmp_path / "c"
    init_cache(root, make_header())
    recs = {i: make_record(rng, i, n=2, m=1) for i in ("a", "b", "c", "d")}
    for name, ids in (("s-00000", "ab"), ("s-00001", "ab"), ("s-00002", "bcd")):
        with ShardWriter(root, name, split="train") as w:
            for i in ids:
                w.add(recs[i])
    with pytest.raises(CacheError, match="in two shards.*maskteacher cache repair"):
        finalize(root)
    assert main(["cache", "repair", str(root)]) == 0
    out = capsys.readouterr().out
    assert "deleted shards/s-00001.zarr" in out and "wrote shards/s-00002.dedup.zarr" in out
    assert "3 duplicate copies dropped; 4 images in the manifest" in out
    reader = open_cache(root)
    assert sorted(reader.image_ids) == ["a", "b", "c", "d"]
    for i, rec in recs.items():
        np.testing.assert_array_equal(reader[i].gt_masks, rec.gt_masks)
        np.testing.assert_array_equal(reader[i].teacher_iou, rec.teacher_iou)
    assert main(["cache", "verify", str(root), "--quiet"]) == 0
    assert sorted(os.listdir(root / "shards")) == [
        "s-00000.json",
        "s-00000.zarr",
        "s-00002.dedup.json",
        "s-00002.dedup.zarr",
    ]
