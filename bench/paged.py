"""Run `kvblocks bench paged` (see `python bench/paged.py --help`)."""

import sys

from kvblocks.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "paged", *sys.argv[1:]]))
