"""``python -m tpfx``: the same command as the ``tpfx`` console script."""

import sys

from tpfx.cli import main

if __name__ == "__main__":  # spawned ranks re-import this module; only the real start runs the command
    sys.exit(main())
