"""What a training step is fed: typed batches, prompts, the dataset, sampling, teacher sources.

- :mod:`.batch` -- containers (:class:`~.batch.TrainSample`, :class:`~.batch.Batch`,
  :class:`~.batch.TeacherTargets`, :class:`~.batch.PromptSet`) and the ragged collate;
- :mod:`.prompts` -- prompt sources (everything mode) and per-object prompts (single mode);
- :mod:`.dataset` -- :class:`~.dataset.TrainDataset` (input frame image, low-res GT, prompts,
  flips) and the reader target source;
- :mod:`.sampler` -- resumable training order, validation sharding, loaders;
- :mod:`.cache` -- GT and teacher outputs from the teacher cache, and the cache checks;
- :mod:`.online_teacher` -- the teacher run online as a batch hook when there is no cache.
"""
