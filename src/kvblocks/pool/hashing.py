"""Sequence hashes: the name of a block's contents, the same on every process and machine.

A block's hash covers its own token ids and, through its parent's hash, every token before it,
so equal hashes mean equal prefixes. For block ``i`` of a sequence::

    h[i] = BLAKE3-keyed(KEY, parent || tokens)[:8] as a little-endian uint64
    parent = h[i - 1] as 8 little-endian bytes (for the first block: ROOT_HASH)
    tokens = the block's token ids, each a little-endian uint32 (4 bytes)

``KEY`` is fixed (:data:`HASH_KEY`), so two workers always agree; a ``salt`` (an adapter id,
say) may be mixed into the root to keep unrelated caches apart. Only full blocks are hashed.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence

import blake3

from kvblocks.checks import positive_int
from kvblocks.errors import InvalidArgumentError

#: The 32-byte key of every sequence hash (version 1 of the scheme).
HASH_KEY = b"kvblocks sequence hash, v1......"
#: The parent of a sequence's first block.
ROOT_HASH = 0x6B76626C6F636B73  # "kvblocks"

assert len(HASH_KEY) == 32


def block_hash(parent: int, token_ids: Sequence[int]) -> int:
    """The 64-bit hash of one block whose parent block hashes to ``parent``."""
    data = struct.pack(f"<Q{len(token_ids)}I", parent, *token_ids)
    return int.from_bytes(blake3.blake3(data, key=HASH_KEY).digest(8), "little")


def root_hash(salt: int = 0) -> int:
    """The parent hash of a sequence's first block; a non-zero ``salt`` gives another root."""
    return ROOT_HASH if salt == 0 else block_hash(ROOT_HASH, [salt & 0xFFFFFFFF, salt >> 32])


def sequence_hashes(
    token_ids: Sequence[int], block_size: int, parent: int | None = None, salt: int = 0
) -> list[int]:
    """Hashes of the full blocks of ``token_ids`` (a trailing partial block is not hashed).

    Args:
        token_ids: the sequence's tokens, each in ``[0, 2**32)``.
        block_size: tokens per block.
        parent: the hash of the block before ``token_ids[0]`` (to continue a sequence);
            by default the sequence starts at the root.
        salt: mixed into the root, to keep caches of different adapters apart.

    Raises:
        InvalidArgumentError: a bad block size, or a token id outside ``[0, 2**32)``.
    """
    positive_int(block_size, "block_size")
    count = len(token_ids) // block_size * block_size
    try:
        data = _little_uint32(token_ids[:count])
    except (OverflowError, TypeError):
        bad = next(i for i, t in enumerate(token_ids[:count]) if not _is_token(t))
        raise InvalidArgumentError(
            "token_ids", f"must hold ints in [0, 2**32), got {token_ids[bad]!r} at index {bad}"
        ) from None
    keyed = blake3.blake3(key=HASH_KEY)  # copied per block: cheaper than keying each anew
    step = 4 * block_size
    hashes = []
    previous = root_hash(salt) if parent is None else parent
    for start in range(0, len(data), step):
        h = keyed.copy()
        h.update(previous.to_bytes(8, "little"))
        h.update(data[start : start + step])
        previous = int.from_bytes(h.digest(8), "little")
        hashes.append(previous)
    return hashes


def _little_uint32(token_ids: Sequence[int]) -> bytes:
    """``token_ids`` as little-endian uint32s, packed in one C loop.

    Raises:
        OverflowError, TypeError: a token id that is not an int in ``[0, 2**32)``.
    """
    packed = array(_UINT32, token_ids)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


#: The array typecode of a 4-byte unsigned int on this platform.
_UINT32 = next(code for code in "IL" if array(code).itemsize == 4)


def _is_token(value: object) -> bool:
    try:
        struct.pack("<I", value)
    except struct.error:
        return False
    return True
