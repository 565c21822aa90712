"""``python -m maskteacher``: the command line (:func:`maskteacher.cli.main`)."""

import sys

from maskteacher.cli import main

if __name__ == "__main__":
    sys.exit(main())
