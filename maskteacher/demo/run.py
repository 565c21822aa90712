"""The demo's stages, each timed, each with its own progress bars:

1. make the sample data (:data:`~.scenario.SPLITS`): the original domain's training and
   validation sets, the partly annotated fine-tuning split and its fully annotated validation set;
2. check the shipped teacher (:mod:`.teacher`) -- nothing is written before it passes;
3. train the student base on the original domain (the stand-in for ``mobile_sam.pt``);
4. precompute the teacher's everything-mode cache for the fine-tuning split and its validation
   set (``maskteacher precompute``);
5. fine-tune the base with every method x seed, streaming the teacher from the cache, each run
   evaluated on both validation sets: one ``maskteacher sweep``;
6. evaluate the teacher and the student base on both validation sets (the reference rows);
7. write ``report.md`` (:mod:`.report`).

Every stage runs on one torch thread: on a CPU the thread count changes the order of
floating-point sums, so a fixed count gives the same tables on every run of the same command
on the same kind of machine (and on two shared cores one thread is rarely slower).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskteacher.config import Config, config_from_dict
from maskteacher.demo import scenario
from maskteacher.demo.scenario import DemoPaths, DemoSettings
from maskteacher.demo.teacher import Teacher, load_teacher
from maskteacher.errors import UserError

log = logging.getLogger(__name__)

MARKER = ".maskteacher-demo"
REFERENCE_MODELS = ("teacher", "student_base")


@dataclass
class StageTime:
    name: str
    seconds: float


@dataclass
class DemoResult:
    """What the demo did: stage times, the reference models' metrics (model -> eval set ->
    summary), the sweep's folder, the machine's load averages at the start and the end."""

    out: Path
    report: Path
    settings: DemoSettings
    teacher: Teacher
    stages: list[StageTime] = field(default_factory=list)
    reference: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    load: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    @property
    def paths(self) -> DemoPaths:
        return DemoPaths(self.out)


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(
                f"{out} exists and is not empty; choose another --out (the demo only replaces "
                "folders it created itself)"
            )
        if not force:
            raise UserError(f"{out} holds an earlier demo run; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("created by maskteacher demo\n")


def save_config(out: Path, name: str, raw: dict[str, Any]) -> Config:
    """Validate a stage's config and keep it as ``OUT/configs/<name>.yaml``."""
    cfg = config_from_dict(raw)
    folder = out / "configs"
    folder.mkdir(exist_ok=True)
    cfg.save(folder / f"{name}.yaml")
    return cfg


class _Timer:
    def __init__(self, stages: list[StageTime], name: str) -> None:
        self.stages, self.name = stages, name

    def __enter__(self) -> _Timer:
        log.info("demo: %s", self.name)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stages.append(StageTime(self.name, time.perf_counter() - self.start))


def _make_data(p: DemoPaths, s: DemoSettings) -> None:
    from maskteacher.data import make_sample

    for split, (style, offset, full) in scenario.SPLITS.items():
        make_sample(
            p.data(split),
            images=scenario.split_images(s, split),
            seed=s.seed + offset,
            style=style,
            unlabelled=0.0 if full else s.unlabelled,
        )


def _train_base(p: DemoPaths, s: DemoSettings) -> Path:
    from maskteacher.train import train

    run = train(save_config(p.out, "student_base", scenario.student_base_config(p, s)))
    if run.export_path is None or not Path(run.export_path).is_file():
        raise RuntimeError("the student base run did not export its weights")
    return Path(run.export_path)


def _precompute(p: DemoPaths, s: DemoSettings, teacher: Teacher) -> None:
    from maskteacher.precompute import PrecomputeJob, run_precompute

    raw = scenario.precompute_config(p, s, teacher.checkpoint, teacher.model_type)
    summary = run_precompute(PrecomputeJob.from_config(save_config(p.out, "precompute", raw)))
    print(summary.format())
    if summary.exit_code:
        raise RuntimeError("precompute failed: see the summary above")


def _fine_tune(p: DemoPaths, s: DemoSettings, teacher: Teacher, base: Path) -> None:
    from maskteacher.sweep import collect, expand, parse_variants, run_sweep
    from maskteacher.sweep.spec import Sweep

    raw = scenario.fine_tune_config(p, s, teacher.checkpoint, base, teacher.model_type)
    sweep = Sweep.create(
        save_config(p.out, "fine_tune", raw),
        out=p.sweep,
        combinations=expand(parse_variants(scenario.variant_arguments()), []),
        seeds=s.fine_tune_seeds,
        evals={"fine": str(p.data("fine_val")), "original": str(p.data("original_val"))},
        threads=1,
        overlays=2,
    )
    done = run_sweep(sweep)
    results = collect(p.sweep)
    if done.failed:
        first = next(r for r in results.records if r.status == "failed")
        raise RuntimeError(
            f"{len(done.failed)} fine-tuning runs failed (see {p.sweep / 'summary.md'}); "
            f"first: {first.combination} seed {first.seed}: {first.data.get('error')}"
        )


def _evaluate_references(result: DemoResult, base: Path) -> None:
    from maskteacher.eval.run import evaluate_checkpoint

    p, s, teacher = result.paths, result.settings, result.teacher
    models = {
        "teacher": (teacher.checkpoint, teacher.model_type),
        "student_base": (base, s.student_type),
    }
    for name, (ckpt, model_type) in models.items():
        for eval_name, split in (("fine", "fine_val"), ("original", "original_val")):
            cfg = config_from_dict(
                scenario.eval_config(p, s, model_type, split, eval_name == "fine")
            )
            summary = evaluate_checkpoint(cfg, ckpt, p.out / "eval" / name / eval_name, overlays=2)
            result.reference.setdefault(name, {})[eval_name] = summary.summary()


def run_demo(
    out: str | Path,
    *,
    settings: DemoSettings | None = None,
    force: bool = False,
    teacher_dir: str | Path | None = None,
) -> DemoResult:
    """Run every stage into ``out``; returns the figures and the path of ``report.md``."""
    import torch

    from maskteacher.demo.report import write_report

    s = settings or DemoSettings()
    teacher = load_teacher(teacher_dir)
    if teacher.image_size != s.image_size:
        raise UserError(
            f"the demo teacher was made at image_size {teacher.image_size}, the demo runs at "
            f"{s.image_size}; re-make it with maskteacher demo --make-teacher"
        )
    out = Path(out)
    _prepare_out(out, force)
    result = DemoResult(out=out, report=out / "report.md", settings=s, teacher=teacher)
    result.load["start"] = os.getloadavg()
    p, stages = result.paths, result.stages
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _Timer(stages, "make sample data (4 splits)"):
            _make_data(p, s)
        with _Timer(stages, f"train student base ({s.student_type}, original domain, random init)"):
            base = _train_base(p, s)
        with _Timer(stages, "precompute teacher cache (fine-tuning split + its validation set)"):
            _precompute(p, s, teacher)
        runs = len(scenario.METHODS) * s.seeds
        with _Timer(
            stages,
            f"fine-tune: {len(scenario.METHODS)} methods x {s.seeds} seeds ({runs} runs + evaluation, sweep)",
        ):
            _fine_tune(p, s, teacher, base)
        with _Timer(stages, "evaluate teacher and student base"):
            _evaluate_references(result, base)
    finally:
        torch.set_num_threads(threads)
    result.load["end"] = os.getloadavg()
    write_report(result)
    return result
