"""Segment-everything (and single-prompt) fine-tuning of SAM-family students.

Entry point: :func:`train` (``maskteacher train CONFIG``). The flow, bottom to top (a module
imports only from its own level or below; ``tests/test_import_direction.py`` checks it):

1. ``schedule``, ``checkpoint``, ``logger``, ``distributed``, ``run_folder`` -- leaves: LR
   schedule and epoch settings, checkpoint files, TensorBoard / progress bar, DDP helpers, the
   run folder's checks and lock;
2. :mod:`.data` -- typed batches, prompts, the dataset, sampling, teacher sources (cache,
   online teacher);
3. :mod:`.student` -- the student's forward pass (encode, batched decoding);
4. :mod:`.supervision` -- matcher, losses, criterion, the strategies (gt, single, replace_gt,
   dual_supervision) in the plain dict ``SUPERVISIONS``;
5. :mod:`.distill` -- feature-distillation losses and blocks (``BLOCKS``, the origin's four
   included), the teacher's decoder run on cached embeddings, the auxiliary loss;
6. ``validate``, ``visual``, ``engine`` -- validation IoU, overlay pictures, the step and the
   epoch loop;
7. :mod:`.plan` -- the run plan: every setting and config-derived part as plain values;
8. :mod:`.builders` -- the only module that reads the Config (Config -> plan);
   :mod:`.assemble` -- opens what the plan names (datasets, caches, teacher weights);
9. :mod:`.run` -- the run: setup, epochs, checkpoints, export.
"""

from maskteacher.train.run import TrainResult, train

__all__ = ["TrainResult", "train"]
