"""Run `kvblocks bench contention` (see `python bench/contention.py --help`)."""

import sys

from kvblocks.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "contention", *sys.argv[1:]]))
