"""Run `kvblocks bench permute` (see `python bench/permute.py --help`)."""

import sys

from kvblocks.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "permute", *sys.argv[1:]]))
