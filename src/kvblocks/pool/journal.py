"""The G3 journal: which slots of the disk tier's file hold which blocks, kept across restarts.

One JSON object per line, appended and ``fsync`` ed::

    {"journal": 1, "fingerprint": {...}}                      the header: what the file holds
    {"stored": [[hash, slot, checksum, parent, [token, ...]], ...]}
    {"removed": [hash, ...]}

A block is recorded as stored only after its bytes are written and synced to the file, and a
slot's old block is recorded as removed before new bytes go into the slot; so after a crash at
any point every block the journal names has complete bytes. ``checksum`` is the BLAKE3 of the
block's bytes, checked again when the block is read back. A torn last line (the process died
while appending) is ignored. On open the journal is rewritten with only the live blocks.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import dataclass

from kvblocks.errors import StorageError

VERSION = 1

log = logging.getLogger("kvblocks.pool")


@dataclass(frozen=True)
class StoredBlock:
    """A block in the disk tier: its sequence hash, slot, BLAKE3 checksum (hex) and chain."""

    seq_hash: int
    slot: int
    checksum: str
    parent: int | None
    token_ids: tuple[int, ...]

    def to_json(self) -> list:
        return [self.seq_hash, self.slot, self.checksum, self.parent, list(self.token_ids)]

    @classmethod
    def from_json(cls, row: list) -> StoredBlock:
        seq_hash, slot, checksum, parent, tokens = row
        return cls(int(seq_hash), int(slot), str(checksum), parent, tuple(tokens))


class Journal:
    """Opens (or starts) the journal at ``path`` for a file described by ``fingerprint``.

    A journal whose header has another version or fingerprint (another model, block size or
    tier size) is discarded: its file's contents mean nothing to this one. The journal is
    locked (``path + ".lock"``, an exclusive ``flock``) from here to :meth:`close`, so no
    second journal, in this process or another, opens it meanwhile; the lock goes with the
    process that held it, however it ends.

    Attributes:
        blocks: the live blocks, by sequence hash, in the order they were stored.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict, num_slots: int) -> None:
        self.path = os.fspath(path)
        self.fingerprint = fingerprint
        self.blocks: dict[int, StoredBlock] = {}
        self._lock = _lock(self.path + ".lock")
        try:
            self._read(num_slots)
            self._rewrite()
            self._file = open(self.path, "a", encoding="utf-8")
        except BaseException:
            os.close(self._lock)
            raise

    def _read(self, num_slots: int) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot read the journal: {exc.strerror}", self.path) from None
        try:
            header = json.loads(lines[0])
        except ValueError:
            return
        if header != {"journal": VERSION, "fingerprint": self.fingerprint}:
            return
        by_slot: dict[int, int] = {}
        for line in lines[1:]:
            try:
                record = json.loads(line)
                stored = [StoredBlock.from_json(r) for r in record.get("stored", ())]
                removed = [int(h) for h in record.get("removed", ())]
            except (ValueError, TypeError, AttributeError):
                break  # a torn or foreign line: nothing after it is trusted
            for h in removed:
                old = self.blocks.pop(h, None)
                if old is not None:
                    del by_slot[old.slot]
            for block in stored:
                if not 0 <= block.slot < num_slots:
                    continue
                previous = by_slot.get(block.slot)
                if previous is not None:
                    del self.blocks[previous]
                self.blocks.pop(block.seq_hash, None)
                self.blocks[block.seq_hash] = block
                by_slot[block.slot] = block.seq_hash

    def _rewrite(self) -> None:
        temp = self.path + ".tmp"
        try:
            with open(temp, "w", encoding="utf-8") as f:
                f.write(json.dumps({"journal": VERSION, "fingerprint": self.fingerprint}) + "\n")
                if self.blocks:
                    rows = [b.to_json() for b in self.blocks.values()]
                    f.write(json.dumps({"stored": rows}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
        except OSError as exc:
            raise StorageError(f"cannot write the journal: {exc.strerror}", self.path) from None

    def record_stored(self, blocks: list[StoredBlock]) -> None:
        """Append stored blocks (their bytes must already be synced to the file)."""
        if blocks:
            self._append({"stored": [b.to_json() for b in blocks]})
            for b in blocks:
                self.blocks[b.seq_hash] = b

    def record_removed(self, hashes: list[int]) -> None:
        """Append removed blocks (before their slots are overwritten)."""
        if hashes:
            self._append({"removed": hashes})
            for h in hashes:
                self.blocks.pop(h, None)

    def _append(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise StorageError(f"cannot append to the journal: {exc.strerror}", self.path) from None

    def close(self) -> None:
        self._file.close()
        os.close(self._lock)


def _lock(path: str) -> int:
    """An open descriptor of ``path`` holding an exclusive lock on it, the holder's pid written
    in it.

    On a filesystem that cannot lock, a warning is logged and the descriptor returned unlocked.

    Raises:
        StorageError: another descriptor holds the lock (the message names its process), or the
            file cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StorageError(f"cannot open the lock: {exc.strerror}", path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StorageError(
            f"is held by another BlockManager (process {holder}) using the same disk tier:"
            " give each worker its own offload_path or disk_cache_key (one per"
            " tensor-parallel rank, say)",
            path,
        ) from None
    except OSError as exc:  # a filesystem without locks (some network mounts)
        log.warning(
            "%s: cannot be locked (%s); nothing stops a second BlockManager from opening the"
            " same disk tier",
            path,
            exc.strerror,
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
