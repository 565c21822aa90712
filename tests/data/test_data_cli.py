"""``maskteacher data make-sample`` and ``maskteacher data stats``, run in-process."""

from __future__ import annotations

import json
import shutil

import pytest

from maskteacher.cli import main
from maskteacher.data import open_dataset


@pytest.mark.parametrize("fmt", ["folder", "sa1b", "coco"])
def test_make_sample_then_stats_json(fmt, tmp_path, capsys):
    out = tmp_path / "ds"
    assert (
        main(["data", "make-sample", str(out), "--format", fmt, "--images", "3", "--seed", "2"])
        == 0
    )
    assert str(out) in capsys.readouterr().out
    assert len(open_dataset(out)) == 3

    assert main(["data", "stats", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 3
    assert report["format"] == fmt
    assert set(report["masks"]) == {"total", "min", "median", "max"}
    ds = open_dataset(out)
    counts = sorted(ds.mask_count(i) for i in range(3))
    assert report["masks"] == {
        "total": sum(counts),
        "min": counts[0],
        "median": float(counts[1]),
        "max": counts[2],
    }
    assert report["bad"] == []
    sizes = sorted((d["h"], d["w"]) for d in report["sizes"]["distinct"])
    assert sizes == sorted(ds.image_hw(i) for i in range(3))


def test_make_sample_defaults(tmp_path, capsys):
    assert main(["data", "make-sample", str(tmp_path / "d")]) == 0
    ds = open_dataset(tmp_path / "d")
    assert ds.format == "folder" and len(ds) == 8


def test_stats_text_output(sample_roots, capsys):
    assert main(["data", "stats", str(sample_roots["folder"]), "--format", "folder"]) == 0
    text = capsys.readouterr().out
    assert "images: 6 (0 without objects)" in text
    assert "objects per image: min" in text and "image sizes" in text
    assert "bad items: 0" in text


def test_stats_reports_all_bad_items_and_exit_codes(sample_roots, tmp_path, capsys):
    root = shutil.copytree(sample_roots["folder"], tmp_path / "ds")
    (root / "image" / "sample_0000.png").write_bytes(b"broken")
    (root / "mask" / "sample_0003" / "0.png").write_bytes(b"broken too")
    jpeg = root / "image" / "sample_0005.jpg"
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) // 2])  # header intact, body truncated

    assert main(["data", "stats", str(root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 4
    items = [b["item"] for b in report["bad"]]
    assert any("sample_0000.png" in i for i in items) and any("sample_0003" in i for i in items)
    assert all(set(b) == {"item", "reason", "kind"} for b in report["bad"])

    assert main(["data", "stats", str(root), "--json", "--full"]) == 1
    full = json.loads(capsys.readouterr().out)
    assert full["images"] == 3 and len(full["bad"]) == 3
    assert any(str(jpeg) in b["item"] and "cannot decode image" in b["reason"] for b in full["bad"])

    assert main(["data", "stats", str(root), "--skip-bad"]) == 0
    assert "bad items: 2" in capsys.readouterr().out


def test_user_errors_exit_2(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["data", "make-sample", str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_help_lists_real_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "make-sample" in text and "stats" in text
    for sub in ("make-sample", "stats"):
        with pytest.raises(SystemExit):
            main(["data", sub, "--help"])
        assert "--format" in capsys.readouterr().out


def test_make_sample_style_and_unlabelled_options(tmp_path, capsys):
    out = tmp_path / "part"
    args = ["data", "make-sample", str(out), "--style", "shifted", "--unlabelled", "0.5"]
    assert main([*args, "--images", "4"]) == 0
    assert "style shifted" in capsys.readouterr().out
    from maskteacher.data import generate_sample

    truth = generate_sample(4, style="shifted", unlabelled=0.5)
    ds = open_dataset(out)
    assert [ds.mask_count(i) for i in range(4)] == [len(s.annotated) for s in truth]
    assert main(["data", "make-sample", str(tmp_path / "x"), "--unlabelled", "2"]) == 2


def test_make_sample_style_help_names_every_style_and_unknown_is_one_line(tmp_path, capsys):
    """--style is checked when the command runs (the parser is built without importing the data
    readers, which import torch): its help names every style, an unknown one is one line."""
    from maskteacher.data.sample_styles import SAMPLE_STYLES

    with pytest.raises(SystemExit):
        main(["data", "make-sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in SAMPLE_STYLES)
    assert main(["data", "make-sample", str(tmp_path / "s"), "--style", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown sample style 'nope'" in err[0]
    assert not (tmp_path / "s").exists()
