"""Feature distillation (the ``distillation`` block): losses, blocks, the auxiliary loss.

- :mod:`.losses` -- pure feature losses (MSE, temperature KL, attention transfer, RKD);
- :mod:`.blocks` -- one frozen dataclass per config block, :data:`~.blocks.BLOCKS`;
- :mod:`.feature_kd` -- :class:`~.feature_kd.FeatureDistillation`, run after the strategy.
"""
