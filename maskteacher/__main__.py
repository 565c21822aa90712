import sys

from maskteacher.cli import main

sys.exit(main())
