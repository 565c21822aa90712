"""Drawing for humans: masks filled in colour, outlines, side-by-side panels, PNG files.

- :mod:`.overlay` -- numpy + PIL drawing primitives (``cache view`` uses them too);
- :mod:`.panels` -- the image | ground truth | student | teacher rows of ``maskteacher eval``
  and the trainer's ``visual`` section, and file names for image ids;
- :mod:`.cached_teacher` -- a cached teacher's masks in the original frame (imports torch and
  the cache reader; import it directly, this package does not).

Sits above ``data``/``models``/``cache_format`` and below ``train`` and ``eval``.
"""

from maskteacher.viz.overlay import draw_masks, mask_outlines, palette, save_png, side_by_side

__all__ = ["draw_masks", "mask_outlines", "palette", "save_png", "side_by_side"]
