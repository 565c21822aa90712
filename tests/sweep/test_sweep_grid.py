"""The sweep's grid: expansion, parsing errors, job-array slices (pure functions)."""

from __future__ import annotations

import pytest

from maskteacher.errors import UserError
from maskteacher.sweep.grid import (
    Combination,
    expand,
    parse_grid,
    parse_seeds,
    parse_variants,
    runs_of,
    select_slice,
)


def test_grid_is_the_cartesian_product_last_key_fastest():
    combos = expand(
        [], parse_grid(["train.lr=1e-3,1e-2", "mask_teacher.soft_loss.type=l2,kl,kl_teacher"])
    )
    assert [c.overrides for c in combos] == [
        (("train.lr", lr), ("mask_teacher.soft_loss.type", t))
        for lr in ("1e-3", "1e-2")
        for t in ("l2", "kl", "kl_teacher")
    ]
    assert combos[0].name == "train.lr=1e-3,mask_teacher.soft_loss.type=l2"
    assert len({c.folder for c in combos}) == 6 and all("/" not in c.folder for c in combos)


def test_variants_times_grid_and_no_grid():
    variants = parse_variants([["gt_only", "mask_teacher.enable=false"], ["plain"]])
    assert variants == [
        Combination("gt_only", (("mask_teacher.enable", "false"),)),
        Combination("plain", ()),
    ]
    combos = expand(variants, parse_grid(["train.lr=1,2"]))
    assert [c.name for c in combos] == [
        "gt_only,train.lr=1",
        "gt_only,train.lr=2",
        "plain,train.lr=1",
        "plain,train.lr=2",
    ]
    assert combos[0].overrides == (("mask_teacher.enable", "false"), ("train.lr", "1"))
    assert [c.name for c in expand(variants, [])] == ["gt_only", "plain"]
    assert expand([], []) == [Combination("base", ())]


def test_values_keep_their_text_for_the_yaml_parser():
    ((key, values),) = parse_grid(["train.grad_clip=null,1.0, 2"])
    assert key == "train.grad_clip" and values == ["null", "1.0", "2"]


@pytest.mark.parametrize(
    "items, message",
    [
        (["train.lr"], "expected KEY=VALUE"),
        (["train.lr=1,,2"], "an empty value"),
        (["train.lr=1,1"], "listed twice"),
        (["train.lr=1", "train.lr=2"], "given twice"),
        (["train.seed=1,2"], "sets train.seed itself"),
        (["model.save_path=a,b"], "sets model.save_path itself"),
        (["train..lr=1"], "empty part"),
    ],
)
def test_bad_grid_items_are_one_clear_error(items, message):
    with pytest.raises(UserError, match=message):
        parse_grid(items)


def test_bad_variants_and_seeds():
    with pytest.raises(UserError, match="used twice"):
        parse_variants([["a"], ["a", "train.lr=1"]])
    with pytest.raises(UserError, match="expected NAME"):
        parse_variants([["train.lr=1"]])
    with pytest.raises(UserError, match="share the folder name"):
        expand(parse_variants([["a/b"], ["a_b"]]), [])
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("0,x", "1,1", "-1"):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 12, 20])
def test_slices_cover_every_run_exactly_once(count):
    combos = expand(parse_variants([["a"], ["b"]]), parse_grid(["train.lr=1,2,3"]))
    runs = runs_of(combos, [0, 1])
    assert len(runs) == 12 and [r.number for r in runs] == list(range(12))
    assert runs[0].folder == "a_train.lr=1/seed_0" and runs[1].folder == "a_train.lr=1/seed_1"
    taken = [r.number for i in range(count) for r in select_slice(runs, i, count)]
    assert sorted(taken) == list(range(12))
    sizes = [len(select_slice(runs, i, count)) for i in range(count)]
    assert max(sizes) - min(sizes) <= 1  # balanced


def test_bad_slices():
    runs = runs_of([Combination("base", ())], [0])
    with pytest.raises(UserError, match="--index 2: expected 0 <= index < --count"):
        select_slice(runs, 2, 2)
    with pytest.raises(UserError, match="--count 0"):
        select_slice(runs, 0, 0)
