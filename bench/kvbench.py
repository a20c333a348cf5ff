"""Run `kvblocks bench kvbench` (see `python bench/kvbench.py --help`)."""

import sys

from kvblocks.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kvbench", *sys.argv[1:]]))
