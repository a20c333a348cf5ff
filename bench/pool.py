"""Run `kvblocks bench pool` (see `python bench/pool.py --help`): the block pool on the CPU."""

import sys

from kvblocks.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "pool", *sys.argv[1:]]))
