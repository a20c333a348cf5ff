"""Remote layouts through NIXL: two TransferManagers in this process, each with its own agent,
exchange serialized layouts and READ / WRITE each other's blocks. Every storage kind on the
local side, both layouts' kinds of memory, format changes (staged through pinned memory),
layer ranges, notifications and the errors; bytes checked as in test_transfer."""

import os
import subprocess
import sys
import time
import uuid
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvblocks.errors import (
    BackendUnavailableError,
    InvalidArgumentError,
    LayoutReleasedError,
    TransferError,
)
from kvblocks.layout import KvBlockLayout, MemoryRegion
from kvblocks.remote import nixl as nixl_module
from kvblocks.remote import nixl_available
from kvblocks.storage import PhysicalLayout, StorageKind
from kvblocks.transfer import (
    FillPattern,
    LogicalLayoutHandle,
    NativeVsNixlPolicy,
    SerializedLayout,
    Strategy,
    TransferCapabilities,
    TransferManager,
    TransferOptions,
    TransferPreferences,
    block_checksums,
    fill_blocks,
)
from tests.test_transfer import (
    CFG,
    FORMAT_PAIRS,
    HND,
    KINDS,
    NHD,
    UNI,
    check_transfer,
    draw_blocks,
    make,
)

needs_nixl = pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")
GPU = torch.cuda.is_available()


def nixl_manager(gpu_rdma=False):
    name = f"kvblocks-test-{uuid.uuid4().hex[:8]}"
    builder = TransferManager.builder().agent_name(name).nixl_backend("ucx")
    return builder.capabilities(TransferCapabilities(allow_gpu_rdma=gpu_rdma)).build()


@pytest.fixture(scope="module")
def pair():
    """(here, there): ``here`` moves blocks to and from layouts of ``there``."""
    if not nixl_available():
        pytest.skip("NIXL is not installed")
    with nixl_manager() as here, nixl_manager() as there:
        yield here, there


def peer_layout(here, there, kind, fc, fmt):
    """A layout of ``there``, imported by ``here``: (remote handle, there's handle)."""
    handle = make(there, kind, fc, fmt)
    blob = there.export_layout(handle).to_bytes()
    return here.import_layout(SerializedLayout.from_bytes(blob)), handle


@needs_nixl
@settings(max_examples=30, deadline=None)
@given(
    local_kind=st.sampled_from(KINDS),
    remote_kind=st.sampled_from(["device", "pinned", "system"]),
    read=st.booleans(),
    local_fc=st.booleans(),
    remote_fc=st.booleans(),
    formats=st.sampled_from(FORMAT_PAIRS),
    data=st.data(),
)
def test_every_local_storage_to_and_from_a_peer(
    pair, local_kind, remote_kind, read, local_fc, remote_fc, formats, data
):
    here, there = pair
    s_fmt, d_fmt = formats
    src_fc, dst_fc = (remote_fc, local_fc) if read else (local_fc, remote_fc)
    src_fc = src_fc or s_fmt == UNI
    dst_fc = dst_fc or d_fmt == UNI
    s_ids, d_ids, layers = draw_blocks(data, formats)
    if read:
        remote, behind = peer_layout(here, there, remote_kind, src_fc, s_fmt)
        src, dst = remote, make(here, local_kind, dst_fc, d_fmt)
        local = dst
    else:
        src = make(here, local_kind, src_fc, s_fmt)
        remote, behind = peer_layout(here, there, remote_kind, dst_fc, d_fmt)
        dst, local = remote, src
    try:
        options = TransferOptions(layer_range=layers)
        direct = (
            not s_fmt.requires_transform(d_fmt)
            and local_kind != "disk"
            and not (local_kind == "device" and GPU)
        )
        wanted = Strategy.NIXL if direct else Strategy.NIXL_BOUNCE
        assert here.strategy(src, dst, options) is wanted
        peers = {remote: there.layout(behind)}
        check_transfer(here, src, s_ids, dst, d_ids, layers, options, peers=peers)
    finally:
        here.release_layout(local)
        here.release_layout(remote)
        there.release_layout(behind)


@needs_nixl
def test_write_notification_reaches_the_peer(pair):
    here, there = pair
    there.nixl_notifications()  # drop what earlier tests sent
    src = make(here, "system", True)
    remote, behind = peer_layout(here, there, "pinned", False, NHD)
    fill_blocks(here.layout(src), range(6), FillPattern.sequential())
    tag = uuid.uuid4().bytes
    other = uuid.uuid4().bytes
    for message in (other, tag):
        options = TransferOptions(nixl_write_notification=message)
        here.execute_transfer(src, [2], remote, [4], options).wait(timeout=60)
    there.wait_for_nixl_notification(here.nixl.name, tag, timeout=30)
    with pytest.raises(TimeoutError, match="no message"):
        there.wait_for_nixl_notification(here.nixl.name, tag, timeout=0.05)  # taken already
    got, deadline = [], time.monotonic() + 30
    while not got and time.monotonic() < deadline:  # the other one, kept for this call
        got += there.nixl_notifications().get(here.nixl.name, [])
        time.sleep(0.001)
    assert got == [other]
    assert block_checksums(there.layout(behind), [4]) == block_checksums(here.layout(src), [2])


@needs_nixl
def test_a_peer_tier_resolves_to_its_import(pair):
    here, there = pair
    behind = make(there, "pinned", True)
    there.build_logical_descriptor(behind, LogicalLayoutHandle.G2)
    here.import_layout(there.export_layout(behind))
    remote = here.resolve(there.address.worker_id, LogicalLayoutHandle.G2)
    src = make(here, "system", False)
    fill_blocks(here.layout(src), range(6), FillPattern.sequential())
    here.execute_transfer(src, [3], remote, [1]).wait(timeout=60)
    assert block_checksums(there.layout(behind), [1]) == block_checksums(here.layout(src), [3])
    for handle in (remote, src):
        here.release_layout(handle)
    there.release_layout(behind)


@needs_nixl
def test_peer_metadata_is_refreshed_on_each_import(pair):
    here, there = pair
    first, first_behind = peer_layout(here, there, "system", True, HND)
    later, later_behind = peer_layout(here, there, "system", True, HND)  # registered after
    src = make(here, "pinned", True, HND)
    fill_blocks(here.layout(src), range(6), FillPattern.sequential())
    again = here.import_layout(there.export_layout(first_behind))  # the same layout twice
    for remote, behind in ((later, later_behind), (first, first_behind), (again, first_behind)):
        here.execute_transfer(src, [0, 5], remote, [3, 1]).wait(timeout=60)
        assert block_checksums(there.layout(behind), [3, 1]) == block_checksums(
            here.layout(src), [0, 5]
        )


@needs_nixl
def test_memory_registered_over_an_import_reconnects_and_retires_the_old_import(pair):
    here, there = pair
    size = CFG.total_bytes
    backing = torch.zeros(2 * size, dtype=torch.uint8)

    def external(offset):
        view = backing[offset : offset + size]
        built = PhysicalLayout.builder(CFG).kv_format(NHD).fully_contiguous()
        return there.register_layout(built.with_external_regions([view]).build())

    old_behind = external(0)
    old = here.import_layout(there.export_layout(old_behind))
    kept_behind = make(there, "system", True)
    kept = here.import_layout(there.export_layout(kept_behind))
    there.release_layout(old_behind)  # deregistered there; `old` still imported here
    new_behind = external(size // 2)  # overlaps the memory `old` names
    new = here.import_layout(there.export_layout(new_behind))
    src = make(here, "system", True)
    fill_blocks(here.layout(src), range(6), FillPattern.sequential())
    for remote, behind in ((new, new_behind), (kept, kept_behind)):
        here.execute_transfer(src, [1, 4], remote, [0, 5]).wait(timeout=60)
        assert block_checksums(there.layout(behind), [0, 5]) == block_checksums(
            here.layout(src), [1, 4]
        )
    with pytest.raises(LayoutReleasedError, match="registered other memory over this layout"):
        here.execute_transfer(src, [0], old, [0])
    for handle in (old, kept, new, src):
        here.release_layout(handle)
    for handle in (kept_behind, new_behind):
        there.release_layout(handle)


@needs_nixl
def test_a_failed_nixl_transfer_completes_with_an_error_and_keeps_local_blocks(pair):
    here, there = pair
    behind = make(there, "system", True)
    described = there.export_layout(behind)
    (region,) = described.regions  # point past the memory the peer registered
    moved = replace(described, regions=(MemoryRegion(region.end + (1 << 20), region.size),))
    remote = here.import_layout(moved)
    dst = make(here, "system", True)
    fill_blocks(here.layout(dst), range(6), FillPattern.of_constant(0xAB))
    before = block_checksums(here.layout(dst), range(6))
    note = here.execute_transfer(remote, [0, 1], dst, [2, 3])
    with pytest.raises(TransferError, match="nixl transfer failed: NIXL READ"):
        note.wait(timeout=60)
    assert block_checksums(here.layout(dst), range(6)) == before
    for handle in (remote, dst):
        here.release_layout(handle)
    there.release_layout(behind)


@needs_nixl
def test_remote_errors_name_the_problem(pair, tmp_path):
    here, there = pair
    remote, behind = peer_layout(here, there, "system", True, NHD)
    other, other_behind = peer_layout(here, there, "system", True, NHD)
    local = make(here, "system", True)
    with pytest.raises(InvalidArgumentError, match="dst is remote, like the source"):
        here.execute_transfer(remote, [0], other, [0])
    with pytest.raises(InvalidArgumentError, match="nixl_write_notification must be bytes"):
        here.execute_transfer(
            local, [0], remote, [0], TransferOptions(nixl_write_notification="text")
        )
    with pytest.raises(InvalidArgumentError, match="applies only to transfers with a remote"):
        here.execute_transfer(local, [0], local, [1], TransferOptions(nixl_write_notification=b"x"))
    disk = make(there, "disk", True, folder=str(tmp_path))
    with pytest.raises(InvalidArgumentError, match="serialized describes disk storage"):
        here.import_layout(there.export_layout(disk))
    with pytest.raises(InvalidArgumentError, match="serialized must be a SerializedLayout"):
        here.import_layout(there.export_layout(behind).to_bytes())
    with TransferManager.builder().build() as plain:  # no agent: exports carry no metadata
        bare = here.import_layout(plain.export_layout(make(plain, "system", True)))
        with pytest.raises(BackendUnavailableError, match="imported without NIXL metadata"):
            here.execute_transfer(local, [0], bare, [0])
        with pytest.raises(BackendUnavailableError, match="no NIXL agent"):
            plain.nixl_notifications()
        with pytest.raises(BackendUnavailableError, match="no NIXL agent"):
            plain.wait_for_nixl_notification("anyone", b"x", timeout=0)
        assert plain.export_layout(make(plain, "pinned", True)).nixl_metadata is None
    for handle in (remote, other, local, bare):
        here.release_layout(handle)
    for handle in (behind, other_behind):
        there.release_layout(handle)


@needs_nixl
def test_backend_names_are_checked():
    with pytest.raises(InvalidArgumentError, match="nixl_backend must be a plugin name"):
        TransferManager.builder().nixl_backend("")
    with pytest.raises(BackendUnavailableError, match="NIXL has no backend 'NO-SUCH-PLUGIN'"):
        TransferManager.builder().agent_name("kvblocks-test-bad").nixl_backend(
            "no-such-plugin"
        ).build()


_CHILD_WORKER = """
import sys
from kvblocks.layout import LayoutConfig
from kvblocks.storage import PhysicalLayout
from kvblocks.transfer import (
    FillPattern, SerializedLayout, TransferManager, TransferOptions, fill_blocks,
)
cfg = LayoutConfig(**{config})
with TransferManager.builder().agent_name(sys.argv[1]).nixl_backend("UCX").build() as m:
    src = m.register_layout(PhysicalLayout.builder(cfg).layer_separate().allocate_system().build())
    fill_blocks(m.layout(src), range(6), FillPattern.sequential())
    theirs = m.import_layout(SerializedLayout.from_bytes(bytes.fromhex(sys.stdin.readline())))
    note = TransferOptions(nixl_write_notification=b"written")
    m.execute_transfer(src, [0, 2], theirs, [5, 1], note).wait(timeout=60)
    print(m.export_layout(src).to_bytes().hex(), flush=True)
    sys.stdin.readline()  # keep the layout alive until the parent has read it
"""


@needs_nixl
def test_workers_in_two_processes(pair):
    """The parent imports a child process's layout and the child the parent's, through their
    serialized bytes: the child writes into the parent's layout, the parent reads the child's."""
    here, _ = pair
    fields = ("num_blocks", "num_layers", "outer_dim", "page_size", "inner_dim")
    config = {f: getattr(CFG, f) for f in (*fields, "dtype_width_bytes", "num_heads")}
    code = _CHILD_WORKER.replace("{config}", repr(config))
    agent = f"kvblocks-test-child-{uuid.uuid4().hex[:6]}"
    dst = make(here, "system", True, KvBlockLayout.Unknown)
    fill_blocks(here.layout(dst), range(6), FillPattern.of_constant(0xAB))
    child = subprocess.Popen(
        [sys.executable, "-c", code, agent],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        child.stdin.write(here.export_layout(dst).to_bytes().hex() + "\n")
        child.stdin.flush()
        theirs = here.import_layout(
            SerializedLayout.from_bytes(bytes.fromhex(child.stdout.readline()))
        )
        back = make(here, "system", False, KvBlockLayout.Unknown)
        here.execute_transfer(theirs, [0, 2], back, [3, 4]).wait(timeout=60)
        assert block_checksums(here.layout(dst), [5, 1]) == block_checksums(
            here.layout(back), [3, 4]
        )
        here.wait_for_nixl_notification(agent, b"written", timeout=30)
        untouched = block_checksums(here.layout(dst), [0, 2, 3, 4])
        assert len(set(untouched)) == 1  # the poison, in every block the child did not write
    finally:
        child.stdin.write("\n")
        child.stdin.close()
        assert child.wait(timeout=60) == 0


@needs_nixl
def test_nixl_logs_stay_off_standard_output():
    code = (
        "from kvblocks.transfer import TransferManager\n"
        "TransferManager.builder().agent_name('quiet').nixl_backend('UCX').build().close()\n"
        "print('only this')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout == "only this\n"
    assert "NIXL" in proc.stderr


def test_nixl_for_local_transfers_is_refused():
    prefer = TransferPreferences(native_vs_nixl=NativeVsNixlPolicy.PREFER_NIXL)
    with pytest.raises(InvalidArgumentError, match="PREFER_NIXL is not offered"):
        TransferManager.builder().preferences(prefer).build()


def test_missing_nixl_is_reported(monkeypatch):
    monkeypatch.setattr(nixl_module, "_API_MODULES", ("kvblocks_no_such_nixl._api",))
    assert not nixl_available()
    with pytest.raises(BackendUnavailableError, match=r"pip install 'kvblocks\[remote\]'"):
        TransferManager.builder().nixl_backend("UCX").build()


@needs_nixl
def test_serialized_layout_carries_metadata_and_device(pair):
    here, there = pair
    handle = make(there, "device", False, HND)
    described = there.export_layout(handle)
    again = SerializedLayout.from_bytes(described.to_bytes())
    assert again == described and again.nixl_metadata == described.nixl_metadata
    assert again.nixl_metadata
    assert again.device_id == (torch.cuda.current_device() if GPU else None)
    there.release_layout(handle)


@pytest.mark.gpu
@needs_nixl
@pytest.mark.parametrize("gpu_rdma", [True, False])
@pytest.mark.parametrize("remote_kind", ["device", "pinned"])
@pytest.mark.parametrize("read", [True, False])
@pytest.mark.parametrize("formats", [(NHD, NHD), (NHD, HND), (HND, UNI)])
def test_gpu_memory_to_and_from_a_peer(gpu_rdma, remote_kind, read, formats):
    if not GPU:
        pytest.skip("needs a CUDA GPU")
    s_fmt, d_fmt = formats
    with nixl_manager(gpu_rdma) as here, nixl_manager() as there:
        if read:
            remote, behind = peer_layout(here, there, remote_kind, True, s_fmt)
            src, dst = remote, make(here, "device", d_fmt == UNI, d_fmt)
        else:
            src = make(here, "device", s_fmt == UNI, s_fmt)
            remote, behind = peer_layout(here, there, remote_kind, True, d_fmt)
            dst = remote
        direct = gpu_rdma and not s_fmt.requires_transform(d_fmt)
        wanted = Strategy.NIXL if direct else Strategy.NIXL_BOUNCE
        assert here.strategy(src, dst) is wanted
        check_transfer(
            here, src, [0, 3, 5], dst, [4, 1, 2], None, peers={remote: there.layout(behind)}
        )
        assert here.layout(remote).storage is StorageKind.REMOTE


def test_nixl_is_found_without_importing_it():
    from kvblocks.platform import probe

    (nixl,) = [c for c in probe() if c.name == "NIXL remote transfers"]
    assert nixl.available == (nixl_module.installed_package() is not None)
    assert nixl.available or "not installed" in nixl.detail


@needs_nixl
def test_idle_agents_leave_the_cpu_alone():
    """An agent's progress thread waits for messages: two idle agents use almost no CPU
    (NIXL's default makes each spin a core)."""
    agents = [nixl_module.NixlAgent(f"idle-{uuid.uuid4().hex[:8]}", ["UCX"]) for _ in range(2)]
    time.sleep(0.2)  # threads started
    cpu, wall = time.process_time(), time.perf_counter()
    time.sleep(1.0)
    share = (time.process_time() - cpu) / (time.perf_counter() - wall)
    assert share < 0.3, f"{len(agents)} idle agents used {share:.2f} CPU seconds a second"


@needs_nixl
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_closing_managers_closes_their_agents():
    """Closed managers leave no NIXL thread behind, even with memory still registered and a
    peer connected; their agents refuse later calls."""
    threads = len(os.listdir("/proc/self/task"))
    here, there = nixl_manager(), nixl_manager()
    remote, behind = peer_layout(here, there, "pinned", True, NHD)
    check_transfer(
        here,
        make(here, "pinned"),
        [0, 2],
        remote,
        [1, 3],
        None,
        peers={remote: there.layout(behind)},
    )
    agent = here.nixl
    there.close()
    here.close()
    here.close()
    assert len(os.listdir("/proc/self/task")) == threads
    with pytest.raises(BackendUnavailableError, match="was closed"):
        agent.notifications()
    here.release_layout(remote)
