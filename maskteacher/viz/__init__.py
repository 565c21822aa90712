"""Drawing overlays for humans: masks filled in colour, outlines, side-by-side panels, PNG files.

numpy + PIL only (used by ``cache view``, evaluation pictures and the trainer's visual logs);
it imports nothing from the rest of the package.
"""

from maskteacher.viz.overlay import draw_masks, mask_outlines, palette, save_png, side_by_side

__all__ = ["draw_masks", "mask_outlines", "palette", "save_png", "side_by_side"]
