"""NUMA placement of pinned memory: node lists, the GPU's node, allocations placed on a node
(their policy, their pages, their lifetime), and G2 placed by a BlockManager."""

import ctypes
import gc
import platform
from types import SimpleNamespace

import pytest
import torch

from kvblocks import platform as kv_platform
from kvblocks.errors import InvalidArgumentError
from kvblocks.pool import BlockManager, Tier
from kvblocks.storage import PhysicalLayout, allocate_pinned, numa
from kvblocks.transfer import Strategy, TransferManager, TransferPreferences, block_checksums
from tests.test_manager import evict_g1, make_config, store
from tests.test_transfer import CFG, NHD, UNI, check_transfer

NODES = numa.online_nodes()
needs_nodes = pytest.mark.skipif(not NODES, reason="the system does not list NUMA nodes")
#: ``get_mempolicy`` per machine, and its flag to ask about the policy of an address.
GET_MEMPOLICY = {"x86_64": 239, "aarch64": 236}
MPOL_F_ADDR = 2


def policy_at(addr: int) -> tuple[int, list[int]]:
    """The memory policy of the page at ``addr``: its mode and its nodes."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    mode = ctypes.c_int()
    mask = (ctypes.c_ulong * 16)()
    done = libc.syscall(
        ctypes.c_long(GET_MEMPOLICY[platform.machine()]),
        ctypes.byref(mode),
        mask,
        ctypes.c_ulong(16 * 64),
        ctypes.c_void_p(addr),
        ctypes.c_ulong(MPOL_F_ADDR),
    )
    assert done == 0, ctypes.get_errno()
    nodes = [w * 64 + b for w in range(16) for b in range(64) if mask[w] >> b & 1]
    return mode.value, nodes


def mapped(addr: int) -> bool:
    """Whether ``addr`` lies in a mapping of this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= addr < high:
                return True
    return False


@pytest.mark.parametrize(
    "text,nodes",
    [("0", [0]), ("0-1", [0, 1]), ("0-1,4", [0, 1, 4]), ("3,1", [1, 3]), ("", [])],
)
def test_node_lists_parse(text, nodes):
    assert numa.parse_node_list(text + "\n") == nodes


@pytest.mark.parametrize("text", ["a", "1-0", "-1", "0-x"])
def test_bad_node_lists_are_refused(text):
    with pytest.raises(InvalidArgumentError, match="not a node list"):
        numa.parse_node_list(text)


@needs_nodes
@pytest.mark.parametrize("size", [1, 4095, 4096 * 3 + 17, 5 << 20])
def test_memory_placed_on_a_node_holds_what_is_written_there(size):
    node = NODES[-1]
    allocation = allocate_pinned(size, numa_node=node)
    view = allocation.view()
    assert allocation.numa_node == node and view.numel() == size
    assert view.data_ptr() % 4096 == 0
    assert view.is_pinned() == torch.cuda.is_available()
    assert policy_at(view.data_ptr()) == (1, [node])  # MPOL_PREFERRED
    assert policy_at(view.data_ptr() + size - 1) == (1, [node])
    data = torch.randint(0, 256, (size,), dtype=torch.uint8)
    view.copy_(data)
    assert torch.equal(view, data)
    where = numa.nodes_of(view)
    pages = -(-size // 4096)
    sampled = sum(where.values())
    assert set(where) == {node} and sampled <= numa.SAMPLE_PAGES
    assert sampled == pages if pages <= numa.SAMPLE_PAGES else sampled >= numa.SAMPLE_PAGES // 2
    allocation.release()


@needs_nodes
def test_placed_memory_outlives_its_release_while_viewed_then_goes():
    allocation = allocate_pinned(1 << 20, numa_node=NODES[0])
    view = allocation.view()
    view.fill_(7)
    addr = view.data_ptr()
    allocation.release()
    gc.collect()
    assert mapped(addr) and bool((view == 7).all())  # a view keeps the memory
    del view
    gc.collect()
    assert not mapped(addr)


@needs_nodes
def test_a_node_that_is_not_online_is_refused_before_anything_is_mapped():
    with open("/proc/self/maps") as maps:
        before = maps.read().count("\n")
    for bad in (max(NODES) + 1, -1, True, "0"):
        with pytest.raises(InvalidArgumentError, match=r"numa_node must be an online NUMA node"):
            allocate_pinned(4096, numa_node=bad)
    with open("/proc/self/maps") as maps:
        assert maps.read().count("\n") <= before


def test_pages_are_asked_of_cpu_tensors_only():
    with pytest.raises(InvalidArgumentError, match="tensor must be a CPU tensor"):
        numa.nodes_of(torch.zeros(4, device="meta"))
    assert numa.nodes_of(torch.zeros(0)) == {}


@needs_nodes
def test_a_layout_builder_places_pinned_memory():
    node = NODES[0]
    physical = PhysicalLayout.builder(CFG).layer_separate().allocate_pinned(numa_node=node).build()
    assert [a.numa_node for a in physical.allocations] == [node] * CFG.num_layers
    assert policy_at(physical.allocations[1].view().data_ptr()) == (1, [node])
    physical.release()
    with pytest.raises(InvalidArgumentError, match="numa_node"):
        PhysicalLayout.builder(CFG).fully_contiguous().allocate_pinned(numa_node=max(NODES) + 1)


def test_the_gpu_node_comes_from_the_gpus_pci_device(tmp_path, monkeypatch):
    """sysfs's ``numa_node`` of the GPU's PCI address, where there are two nodes or more;
    None where it says -1, has no such device, or there is one node."""
    props = SimpleNamespace(pci_domain_id=0, pci_bus_id=0x41, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(numa, "PCI_DIR", tmp_path)
    monkeypatch.setattr(numa, "online_nodes", lambda: [0, 1])
    (tmp_path / "0000:41:00.0").mkdir()
    (tmp_path / "0000:41:00.0" / "numa_node").write_text("1\n")
    assert numa.gpu_node(0) == 1
    (tmp_path / "0000:41:00.0" / "numa_node").write_text("-1\n")
    assert numa.gpu_node(0) is None
    props.pci_bus_id = 0x42
    assert numa.gpu_node(0) is None
    monkeypatch.setattr(numa, "online_nodes", lambda: [0])
    props.pci_bus_id = 0x41
    (tmp_path / "0000:41:00.0" / "numa_node").write_text("0\n")
    assert numa.gpu_node(0) is None


def test_info_says_whether_there_is_anything_to_place(monkeypatch):
    def numa_row():
        (row,) = [c for c in kv_platform.probe() if c.name == "NUMA placement of G2"]
        return row

    monkeypatch.setattr(kv_platform, "online_nodes", lambda: [0])
    assert not numa_row().available and "one NUMA node" in numa_row().detail
    monkeypatch.setattr(kv_platform, "online_nodes", lambda: [])
    assert not numa_row().available and "does not list" in numa_row().detail
    monkeypatch.setattr(kv_platform, "online_nodes", lambda: [0, 1])
    monkeypatch.setattr(kv_platform, "gpu_node", lambda device: 1)
    row = numa_row()
    assert row.available and "nodes 0, 1" in row.detail
    if torch.cuda.is_available():
        assert "GPU 0: 1" in row.detail


@pytest.mark.parametrize("bad", [-1, "cpu", True, 1.0])
def test_config_refuses_a_bad_host_numa_node(tmp_path, bad):
    with pytest.raises(InvalidArgumentError, match="host_numa_node must be 'gpu'"):
        make_config(tmp_path, host_numa_node=bad)


@needs_nodes
def test_a_node_that_is_not_online_is_refused_by_the_manager(tmp_path):
    config = make_config(tmp_path, g3=0, host_numa_node=max(NODES) + 1)
    with pytest.raises(InvalidArgumentError, match="host_numa_node must be an online NUMA node"):
        BlockManager(config)


@needs_nodes
@pytest.mark.parametrize("where", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_g2_on_a_node_keeps_and_gives_back_blocks(tmp_path, where):
    """A manager whose G2 is placed on a node offloads blocks there and brings them back
    whole (G1 too small to keep them)."""
    node = NODES[-1]
    config = make_config(tmp_path, g1=8, g2=12, g3=0, host_numa_node=node)
    gen = torch.Generator().manual_seed(3)
    with BlockManager(config) as manager:
        g2 = manager.layout(Tier.G2)
        assert g2.allocations[0].numa_node == node
        assert policy_at(g2.allocations[0].view().data_ptr()) == (1, [node])
        tokens = list(range(100, 100 + 4 * config.block_size))
        sums = store(manager, tokens, gen)
        manager.flush()
        evict_g1(manager)
        hit = manager.lookup(tokens)
        assert len(hit.block_ids) == 4 and hit.from_tier[Tier.G2] == 4
        g1 = manager.layout(Tier.G1)
        assert block_checksums(g1, hit.block_ids) == [sums[h] for h in hit.hashes]
        manager.free(hit.block_ids)


def test_g2_on_the_gpus_node_is_where_the_system_puts_it_without_one(tmp_path):
    """With one NUMA node (or none named), ``"gpu"`` places nothing: G2 is plain pinned
    memory."""
    with BlockManager(make_config(tmp_path, g3=0)) as manager:
        assert manager.config.host_numa_node == "gpu"
        expected = numa.gpu_node(0) if torch.cuda.is_available() else None
        assert manager.layout(Tier.G2).allocations[0].numa_node == expected


@pytest.mark.gpu
@needs_nodes
@pytest.mark.parametrize("copy_engine", [False, True], ids=["kernel", "copy_engine"])
@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_transfers_read_and_write_placed_pinned_memory(direction, copy_engine):
    """Kernels read and write pinned memory placed on a node through its host address; the
    copy engine moves it too."""
    prefs = TransferPreferences(copy_engine=copy_engine, copy_engine_min_bytes=0)
    with TransferManager.builder().preferences(prefs).build() as manager:
        fmt = NHD if copy_engine else UNI
        builder = PhysicalLayout.builder(CFG).fully_contiguous().kv_format(fmt)
        pinned = manager.register_layout(builder.allocate_pinned(numa_node=NODES[0]).build())
        device_builder = PhysicalLayout.builder(CFG).fully_contiguous().kv_format(NHD)
        device = manager.register_layout(device_builder.allocate_device().build())
        src, dst = (pinned, device) if direction == "h2d" else (device, pinned)
        expected = Strategy.COPY_ENGINE if copy_engine else Strategy.KERNEL
        assert manager.strategy(src, dst) is expected
        check_transfer(manager, src, [5, 0, 3], dst, [1, 2, 4], None)


@needs_nodes
def test_g2_pages_that_landed_off_their_node_are_warned_of(tmp_path, monkeypatch, caplog):
    from collections import Counter

    from kvblocks.pool import manager as manager_module

    node = NODES[0]
    monkeypatch.setattr(manager_module, "nodes_of", lambda t: Counter({node: 100, node + 1: 900}))
    with caplog.at_level("INFO", logger="kvblocks.pool"):
        with BlockManager(make_config(tmp_path, g3=0, host_numa_node=node)):
            pass
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert f"only 100 of 1000 pages sampled are there (node {node}: 100" in warning.message
    monkeypatch.setattr(manager_module, "nodes_of", lambda t: Counter({node: 1000}))
    caplog.clear()
    with caplog.at_level("INFO", logger="kvblocks.pool"):
        with BlockManager(make_config(tmp_path, g3=0, host_numa_node=node)):
            pass
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"on NUMA node {node}" in r.message for r in caplog.records)
