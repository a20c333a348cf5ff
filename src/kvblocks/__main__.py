"""``python -m kvblocks``: the ``kvblocks`` command."""

import sys

from kvblocks.cli import main

sys.exit(main())
