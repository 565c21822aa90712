"""Feature distillation (the ``distillation`` block): losses, blocks, the auxiliary loss.

- :mod:`.losses` -- pure feature losses (MSE, temperature KL, attention transfer, RKD, and the
  origin's cosine / normalised MSE / Bernoulli KL / soft focal);
- :mod:`.teacher_decoder` -- a teacher's prompt encoder + mask decoder run on its cached
  embedding for the student's prompts;
- :mod:`.view` -- :class:`~.view.TeacherView`, what a block sees of one teacher;
- :mod:`.blocks` -- one frozen dataclass per config block, :data:`~.blocks.BLOCKS`;
  :mod:`.prompt_blocks` -- the origin's four (``encoder_patch``, ``prompt_embed``,
  ``decoder_mask_token``, ``dense_mask_logits``);
- :mod:`.feature_kd` -- :class:`~.feature_kd.FeatureDistillation`, run after the strategy.
"""
