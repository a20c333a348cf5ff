"""Benchmarks of the kernels and copy paths on a CUDA GPU (``kvblocks bench``).

- :mod:`~kvblocks.benchmarks.kvbench`: KV block transfers between fully contiguous and
  layer-wise layouts, host<->device and device<->device, per backend.
- :mod:`~kvblocks.benchmarks.permute`: every layout conversion against a plain device copy.
- :mod:`~kvblocks.benchmarks.paged`: copy_blocks / swap_blocks against a plain device copy.
"""
