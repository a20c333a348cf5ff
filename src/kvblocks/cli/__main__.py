"""``python -m kvblocks.cli``: the ``kvblocks`` command."""

import sys

from kvblocks.cli import main

sys.exit(main())
