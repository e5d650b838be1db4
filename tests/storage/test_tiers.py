"""Row stores: every tier holds the same table for the same seed, converts and saves exactly, and refuses bad
files and bad row ids with clear errors. A disk table is read by page, never loaded whole."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.storage import (
    TIERS,
    DeviceRowStore,
    DiskRowStore,
    HostRowStore,
    create_row_store,
    init_rows,
    load_row_store,
    read_disk_header,
    to_tier,
)

NUM_ROWS, DIM, SEED = 300, 8, 7


def make(tier, tmp_path, name="t", **kw):
    kw.setdefault("seed", SEED)
    if tier == "disk":
        kw["path"] = tmp_path / f"{name}.rows"
    if tier == "device":
        kw["device"] = "cpu"
    return create_row_store(tier, kw.pop("num_rows", NUM_ROWS), kw.pop("dim", DIM), **kw)


@pytest.fixture
def stores(tmp_path):
    return {tier: make(tier, tmp_path) for tier in TIERS}


@settings(max_examples=20, deadline=None)
@given(rows=st.lists(st.integers(0, NUM_ROWS - 1), max_size=40))
def test_every_tier_returns_identical_rows_for_the_same_seed_and_ids(tmp_path_factory, rows):
    tmp = tmp_path_factory.mktemp("tiers")
    stores = [make(tier, tmp) for tier in TIERS]
    idx = torch.tensor(rows, dtype=torch.int64)
    ref = stores[0].gather(idx)
    assert ref.shape == (len(rows), DIM)
    for s in stores[1:]:
        assert torch.equal(s.gather(idx), ref)


def test_initial_values_are_normal_with_the_given_std_and_depend_on_the_seed(stores, tmp_path):
    rows = stores["host"].read_range(0, NUM_ROWS)
    assert abs(rows.std().item() - 0.02) < 0.002 and abs(rows.mean().item()) < 0.002
    other = make("host", tmp_path, seed=SEED + 1).read_range(0, NUM_ROWS)
    assert not torch.equal(rows, other)


def test_initial_rows_do_not_depend_on_how_the_table_is_chunked():
    dim = 4096  # 256 rows per init block: the ranges below straddle block boundaries
    whole = init_rows(0, 600, dim, 0.02, seed=3)
    assert torch.equal(init_rows(250, 530, dim, 0.02, seed=3), whole[250:530])
    assert torch.equal(init_rows(599, 600, dim, 0.02, seed=3), whole[599:600])


def test_gather_writes_into_a_given_out_buffer(stores):
    rows = torch.tensor([3, 1, 4, 1, 5])
    for s in stores.values():
        out = torch.empty(5, DIM)
        res = s.gather(rows, out=out)
        assert res.data_ptr() == out.data_ptr() and torch.equal(out, s.gather(rows))
        with pytest.raises(ValueError, match="out must be"):
            s.gather(rows, out=torch.empty(4, DIM))


def test_writes_land_identically_in_every_tier_and_bump_the_version(stores):
    rows = torch.tensor([299, 0, 17])
    values = torch.arange(3 * DIM, dtype=torch.float32).reshape(3, DIM)
    delta = torch.full((3, DIM), 0.5)
    results = []
    for s in stores.values():
        v0 = s.version
        s.scatter(rows, values)
        new = s.apply_update(rows, delta, scale=0.5)
        assert s.version == v0 + 2
        assert torch.equal(new, values * 0.5 + 0.5)
        assert torch.equal(s.gather(rows), new)
        results.append(s.read_range(0, NUM_ROWS).clone())
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_bad_row_ids_are_refused_with_clear_errors(stores):
    for s in stores.values():
        with pytest.raises(IndexError, match=r"\[0, 300\)"):
            s.gather(torch.tensor([0, 300]))
        with pytest.raises(IndexError):
            s.gather(torch.tensor([-1]))
        with pytest.raises(TypeError, match="int64"):
            s.gather(torch.tensor([1.0]))
        with pytest.raises(ValueError, match="1-D"):
            s.gather(torch.zeros(2, 2, dtype=torch.int64))
        with pytest.raises(ValueError, match="repeat"):
            s.scatter(torch.tensor([2, 2]), torch.zeros(2, DIM))
        with pytest.raises(ValueError, match=r"\[2, 8\]"):
            s.scatter(torch.tensor([1, 2]), torch.zeros(2, DIM + 1))


def test_tier_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown tier"):
        create_row_store("ssd", 4, 4)
    with pytest.raises(ValueError, match="needs path"):
        create_row_store("disk", 4, 4)
    with pytest.raises(ValueError, match="only for the disk tier"):
        create_row_store("host", 4, 4, path=tmp_path / "x")
    with pytest.raises(ValueError, match="num_rows > 0"):
        create_row_store("host", 0, 4)
    with pytest.raises(TypeError, match="unsupported table dtype"):
        create_row_store("host", 4, 4, dtype=torch.int32)


@pytest.mark.parametrize("src", TIERS)
@pytest.mark.parametrize("dst", TIERS)
def test_to_tier_copies_the_table_exactly(stores, tmp_path, src, dst):
    kw = {"path": tmp_path / "copy.rows"} if dst == "disk" else ({"device": "cpu"} if dst == "device" else {})
    copy = to_tier(stores[src], dst, **kw)
    assert copy.kind == dst and copy is not stores[src]
    assert torch.equal(copy.read_range(0, NUM_ROWS), stores[src].read_range(0, NUM_ROWS))
    copy.scatter(torch.tensor([0]), torch.ones(1, DIM))  # the copy is independent of the source
    assert not torch.equal(stores[src].gather(torch.tensor([0])), torch.ones(1, DIM))


def test_to_tier_converts_dtype(stores, tmp_path):
    half = to_tier(stores["host"], "disk", path=tmp_path / "bf16.rows", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    reopened = DiskRowStore(tmp_path / "bf16.rows")
    assert torch.equal(reopened.read_range(0, NUM_ROWS), stores["host"].read_range(0, NUM_ROWS).bfloat16())


@pytest.mark.parametrize("tier", TIERS)
def test_save_load_round_trip_per_tier(stores, tmp_path, tier):
    s = stores[tier]
    s.scatter(torch.tensor([5]), torch.full((1, DIM), 3.0))
    path = tmp_path / f"saved_{tier}"
    s.save(path)
    loaded = load_row_store(path, tier, **({"device": "cpu"} if tier == "device" else {}))
    assert loaded.kind == tier
    assert torch.equal(loaded.read_range(0, NUM_ROWS), s.read_range(0, NUM_ROWS))


def test_safetensors_and_disk_files_load_into_any_tier(stores, tmp_path):
    ref = stores["host"].read_range(0, NUM_ROWS)
    stores["host"].save(tmp_path / "t.safetensors")
    assert isinstance(load_row_store(tmp_path / "t.safetensors"), HostRowStore)
    assert isinstance(HostRowStore.load(tmp_path / "t.safetensors"), HostRowStore)
    dev = DeviceRowStore.load(tmp_path / "t.safetensors", device="cpu")
    disk = load_row_store(tmp_path / "t.safetensors", "disk", disk_path=tmp_path / "from_st.rows")
    host_from_disk = load_row_store(stores["disk"].path, "host")
    for s in (dev, disk, host_from_disk):
        assert torch.equal(s.read_range(0, NUM_ROWS), ref)
    assert isinstance(load_row_store(stores["disk"].path), DiskRowStore)


def test_disk_table_survives_reopening(tmp_path):
    s = make("disk", tmp_path)
    s.scatter(torch.tensor([7]), torch.full((1, DIM), 2.5))
    s.flush()
    again = DiskRowStore(s.path, num_rows=NUM_ROWS, dim=DIM, dtype=torch.float32)
    assert torch.equal(again.gather(torch.tensor([7])), torch.full((1, DIM), 2.5))


def test_truncated_disk_file_is_refused(tmp_path):
    s = make("disk", tmp_path)
    size = os.path.getsize(s.path)
    with open(s.path, "r+b") as f:
        f.truncate(size - DIM * 4)  # one row short
    with pytest.raises(ValueError, match="truncated"):
        DiskRowStore(s.path)
    with open(s.path, "r+b") as f:
        f.truncate(100)  # not even a header
    with pytest.raises(ValueError, match="truncated"):
        load_row_store(s.path)


def test_disk_header_with_the_wrong_shape_is_refused(tmp_path):
    s = make("disk", tmp_path)
    with open(s.path, "r+b") as f:
        head = f.read(4096)
        f.seek(0)
        f.write(head.replace(b'"num_rows": 300', b'"num_rows": 200'))  # header no longer matches the data
    with pytest.raises(ValueError, match="does not match the data"):
        read_disk_header(s.path)
    good = make("disk", tmp_path, name="good")
    with pytest.raises(ValueError, match=r"holds a \[300, 8\] float32 table, expected \[300, 16\]"):
        DiskRowStore(good.path, num_rows=NUM_ROWS, dim=16)


def test_files_that_are_not_tables_are_refused(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"x" * 5000)
    with pytest.raises(ValueError, match="not an engram disk table"):
        DiskRowStore(junk)
    with pytest.raises(ValueError, match="not a readable safetensors table"):
        load_row_store(junk)
    with pytest.raises(FileNotFoundError):
        load_row_store(tmp_path / "missing")


def test_disk_tables_refuse_overwrite_and_read_only_writes(tmp_path):
    s = make("disk", tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make("disk", tmp_path)
    ro = DiskRowStore(s.path, readonly=True)
    assert torch.equal(ro.gather(torch.tensor([1])), s.gather(torch.tensor([1])))
    with pytest.raises(PermissionError, match="read-only"):
        ro.scatter(torch.tensor([1]), torch.zeros(1, DIM))


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to measure resident memory")
def test_a_disk_table_larger_than_we_would_allocate_is_read_by_row_not_loaded(tmp_path):
    num_rows, dim = 1 << 20, 64  # 256 MiB of float32 rows
    path = tmp_path / "big.rows"
    before = _rss_bytes()
    s = DiskRowStore.create(path, num_rows, dim, init_std=0.0)  # sparse file: nothing written
    assert os.path.getsize(path) == 4096 + num_rows * dim * 4
    assert os.stat(path).st_blocks * 512 < (1 << 20)  # not materialised on disk either
    rows = torch.randint(0, num_rows, (64,)).unique()
    assert torch.equal(s.gather(rows), torch.zeros(rows.numel(), dim))
    s.scatter(rows[:4], torch.ones(4, dim))
    assert torch.equal(s.gather(rows[:4]), torch.ones(4, dim))
    assert _rss_bytes() - before < (32 << 20)
