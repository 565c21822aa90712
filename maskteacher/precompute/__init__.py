"""Run the mask teacher once over a dataset in everything mode and write the teacher cache.

Entry point: :func:`run_precompute` with a :class:`PrecomputeJob` (``PrecomputeJob.from_config``
builds one from the config); ``maskteacher precompute CONFIG`` is the command line. The
generation itself is :func:`maskteacher.models.everything.generate_everything`, shared with the
trainer's online teacher.
"""

from maskteacher.models.everything import GenerationParams
from maskteacher.precompute.distributed import WorkerContext, resolve_device
from maskteacher.precompute.job import PrecomputeJob, SplitSource
from maskteacher.precompute.run import make_header, run_precompute
from maskteacher.precompute.summary import PrecomputeSummary
from maskteacher.precompute.teacher import (
    TeacherSpec,
    build_teacher,
    state_dict_sha256,
)
from maskteacher.precompute.verify import TeacherVerifyResult, verify_with_teacher

__all__ = [
    "GenerationParams",
    "PrecomputeJob",
    "PrecomputeSummary",
    "SplitSource",
    "TeacherSpec",
    "TeacherVerifyResult",
    "WorkerContext",
    "build_teacher",
    "make_header",
    "resolve_device",
    "run_precompute",
    "state_dict_sha256",
    "verify_with_teacher",
]
