"""``maskteacher demo``: the main job in miniature, small enough for 2 CPU cores.

:mod:`.scenario` (sizes, splits, methods, every stage's config), :mod:`.teacher` (the shipped
teacher checkpoint and ``--make-teacher``), :mod:`.run` (the stages), :mod:`.report`
(``report.md``) and :mod:`.reading` (figures read back from the runs' logs and results).
"""

from maskteacher.demo.scenario import METHODS, QUICK, DemoSettings

__all__ = ["METHODS", "QUICK", "DemoSettings"]
