"""Every Engram table implements the one EngramTable contract: the same fused ids and rows whatever the tier,
fused_ids does no device-to-host read, and id ranges are checked only while validation is on."""

import pytest
import torch

import engram
from engram import MultiHeadEmbedding
from engram.distributed import ShardedEmbedding
from engram.storage import OffloadedEmbedding
from engram.table import EngramTable

HEADS, DIM = [11, 13, 17], 4


def tables(tmp_path):
    torch.manual_seed(0)
    device = MultiHeadEmbedding(HEADS, DIM)
    return {
        "device": device,
        "host": OffloadedEmbedding.from_multihead(device, "host"),
        "disk": OffloadedEmbedding.from_multihead(device, "disk", path=tmp_path / "t.rows"),
        "cached": OffloadedEmbedding.from_multihead(device, "host", cache_bytes=8 * DIM * 4),
    }


def ids():
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randint(0, s, (2, 5), generator=g) for s in HEADS], -1)


def test_every_table_is_an_engram_table_with_the_same_fused_ids_and_rows(tmp_path):
    assert issubclass(ShardedEmbedding, EngramTable)  # built under a process group: tests/distributed
    found = tables(tmp_path)
    x = ids()
    reference = found["device"](x)
    for name, table in found.items():
        assert isinstance(table, EngramTable), name
        assert (table.head_sizes, table.head_dim, table.num_rows) == (HEADS, DIM, sum(HEADS))
        assert torch.equal(table.fused_ids(x), x + torch.tensor([0, 11, 24])), name
        table.prefetch(x)
        assert torch.equal(table(x), reference), name


def test_fused_ids_reads_no_device_value_and_ranges_are_checked_only_while_validation_is_on(monkeypatch):
    table = MultiHeadEmbedding(HEADS, DIM)
    bad = ids()
    bad[0, 0, 1] = HEADS[1]
    with pytest.raises(ValueError, match="out of range"):
        table(bad)

    def read(*args):
        raise AssertionError("a device value was read back to the host")

    for name in ("__bool__", "__int__", "__index__", "__float__", "item", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, read)
    table.fused_ids(ids())
    engram.set_validation(False)
    try:
        table(ids())
    finally:
        engram.set_validation(True)
    with pytest.raises(AssertionError, match="read back"):
        table.check_ids(ids())


def test_shape_and_dtype_are_checked_always():
    table = MultiHeadEmbedding(HEADS, DIM)
    with pytest.raises(TypeError, match="int64"):
        table.fused_ids(ids().int())
    with pytest.raises(ValueError, match="one id per head"):
        table.fused_ids(ids()[..., :2])
    with pytest.raises(ValueError, match="positive"):
        MultiHeadEmbedding([3, 0], DIM)
