"""Moving blocks between registered layouts in any two kinds of storage.

- :class:`TransferManager` (and its builder): registration, ``execute_transfer``; its
  arguments are checked by :mod:`~kvblocks.transfer.arguments`, its routes
  (:mod:`~kvblocks.transfer.strategy`) run by :class:`~kvblocks.transfer.runner.Runner`.
- :class:`TransferOptions`, :class:`TransferCapabilities`, :class:`TransferPreferences`,
  :class:`BounceBuffer`: how to move.
- :class:`TransferCompleteNotification`: completion to await, wait on, poll or aggregate;
  :class:`StreamEvent` and :func:`wait_for`: ordering work between CUDA streams with the GIL
  held (:mod:`~kvblocks.kernels.cuda_calls`).
- :class:`LayoutHandle`, :class:`WorkerAddress`, :class:`SerializedLayout`: naming layouts
  within and across workers.
- :mod:`~kvblocks.transfer.verify`: BLAKE3 checksums and fill patterns.
"""

from kvblocks.kernels.cuda_calls import StreamEvent, wait_for
from kvblocks.transfer.handles import (
    LayoutHandle,
    LogicalLayoutDescriptor,
    LogicalLayoutHandle,
    WorkerAddress,
)
from kvblocks.transfer.manager import TransferConfig, TransferManager, TransferManagerBuilder
from kvblocks.transfer.notification import TransferCompleteNotification
from kvblocks.transfer.options import (
    BounceBuffer,
    NativeVsNixlPolicy,
    TransferCapabilities,
    TransferOptions,
    TransferPreferences,
)
from kvblocks.transfer.serialize import SerializedLayout
from kvblocks.transfer.strategy import Strategy
from kvblocks.transfer.verify import (
    FillPattern,
    block_checksums,
    block_checksums_as,
    fill_blocks,
    layer_checksums,
)

__all__ = [
    "BounceBuffer",
    "FillPattern",
    "LayoutHandle",
    "LogicalLayoutDescriptor",
    "LogicalLayoutHandle",
    "NativeVsNixlPolicy",
    "SerializedLayout",
    "Strategy",
    "StreamEvent",
    "TransferCapabilities",
    "TransferCompleteNotification",
    "TransferConfig",
    "TransferManager",
    "TransferManagerBuilder",
    "TransferOptions",
    "TransferPreferences",
    "WorkerAddress",
    "block_checksums",
    "block_checksums_as",
    "fill_blocks",
    "layer_checksums",
    "wait_for",
]
