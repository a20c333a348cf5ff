"""Run `kvblocks bench sharing` (see `python bench/sharing.py --help`): prefix lookups served
by another worker's G2 through NIXL, against a local G2 lookup and NIXL alone."""

import sys

from kvblocks.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "sharing", *sys.argv[1:]]))
