"""The TransferManager's benchmarks: `kvblocks bench transfers` (device<->pinned through the
manager against the kernel alone), `kvblocks bench disk` (pinned<->disk against dd) and
`kvblocks bench remote` (device<->another worker's pinned memory through NIXL against the local
path; needs NIXL).

Usage: python bench/transfers.py OUT_DIR [kvblocks bench options]
writes OUT_DIR/transfers.csv, OUT_DIR/disk.csv and OUT_DIR/remote.csv.
"""

import sys
from pathlib import Path

from kvblocks.cli import main

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out")
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    for suite in ("transfers", "disk", "remote"):
        status |= main(["bench", suite, "--csv", str(out / f"{suite}.csv"), *sys.argv[2:]])
    sys.exit(status)
