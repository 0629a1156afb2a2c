"""``python -m SpineInpaintLib``: the command line (see :mod:`SpineInpaintLib.cli`)."""

import sys

from SpineInpaintLib.cli import main

if __name__ == "__main__":
    sys.exit(main())
