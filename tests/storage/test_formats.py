"""Row formats: FP8 E4M3 rows with one E8M0 scale per 32 values round-trip within the derived bound and have the
264-byte layout of a 256-wide row; bf16 rows round-trip within half a bf16 step; every tier gathers identical rows
per format, saves and reopens them with their format, and refuses what it cannot store."""

import json
import math

import numpy as np
import pytest
import torch

from engram.storage import DiskRowStore, create_row_store, load_row_store, to_tier
from engram.storage.formats import BLOCK, FORMATS, FP8_E4M3, check_trainable, row_format
from engram.storage.tiers import DISK_HEADER_BYTES, DISK_MAGIC, read_disk_header

NUM_ROWS, DIM = 300, 64


def fp8_bound(x: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """The per-element bound of the formats module: max(2^-4 |x|, 2^-10 s) with s the element's block scale."""
    s = FP8_E4M3.scales(stored).repeat_interleave(BLOCK, dim=1)
    return torch.maximum(x.abs() * 2**-4, s * 2**-10)


def wide_range_rows(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Signed values whose magnitudes span 2^-30 .. 2^30 within rows (so many elements sit far below their block's
    largest, in E4M3's subnormal range)."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (n, dim), generator=gen) * 2 - 1
    return sign * torch.exp2(torch.rand(n, dim, generator=gen) * 60 - 30) * (1 + torch.rand(n, dim, generator=gen))


def test_fp8_round_trip_error_is_within_the_derived_bound_and_the_bound_is_tight():
    x = torch.cat([wide_range_rows(400, DIM), torch.randn(400, DIM) * 0.02])
    stored = FP8_E4M3.encode(x)
    err = (FP8_E4M3.decode(stored, torch.float32) - x).abs()
    bound = fp8_bound(x, stored)
    assert bool((err <= bound).all()), float((err / bound).max())
    assert float((err / bound).max()) > 0.9  # half a step is reached: the bound is not loose
    # and no element is off by more than 2^-4 of its block's largest magnitude
    amax = x.abs().view(x.shape[0], -1, BLOCK).amax(2).repeat_interleave(BLOCK, dim=1)
    assert bool((err <= amax * 2**-4).all())


def test_fp8_scale_is_the_smallest_power_of_two_that_fits_448_and_nothing_saturates():
    for k in (-20, -3, 0, 5):
        exact = torch.zeros(1, BLOCK)
        exact[0, 0] = 448 * 2.0**k  # amax exactly 448 s: scale 2^k, the value is the E4M3 max
        stored = FP8_E4M3.encode(exact)
        assert int(stored[0, BLOCK]) == k + 127
        assert int(stored[0, 0]) == 0x7E  # 0 1111 110 = 448
        assert float(FP8_E4M3.decode(stored, torch.float32)[0, 0]) == 448 * 2.0**k
        above = exact.clone()
        above[0, 0] = torch.nextafter(above[0, 0], torch.tensor(math.inf))  # one float32 ulp above
        stored = FP8_E4M3.encode(above)
        assert int(stored[0, BLOCK]) == k + 128  # one ulp above 448 s: the scale doubles rather than saturate
        assert float(FP8_E4M3.decode(stored, torch.float32)[0, 0]) == 448 * 2.0**k
    x = torch.tensor([[-448.0, 447.0, -300.0, 1.0] * (BLOCK // 4)])
    y = FP8_E4M3.decode(FP8_E4M3.encode(x), torch.float32)
    assert y[0, 0] == -448 and bool((y.abs() <= 448).all())


def test_fp8_zero_blocks_tiny_values_and_negative_zero():
    gen = torch.Generator().manual_seed(2)
    x = torch.zeros(3, 2 * BLOCK)
    x[1, BLOCK:] = torch.tensor([1e-40, -3e-39, 2e-38, -1e-30] * (BLOCK // 4))  # float32 subnormals and tiny normals
    x[1, 0] = -0.0
    x[2, :BLOCK] = (1 + torch.rand(BLOCK, generator=gen)) * 1e-38  # near float32's smallest normal
    x[2, BLOCK:] = -(1 + torch.rand(BLOCK, generator=gen)) * 1e-30
    stored = FP8_E4M3.encode(x)
    assert stored[0, 2 * BLOCK :].tolist() == [127, 127]  # an all-zero block gets scale 1
    y = FP8_E4M3.decode(stored, torch.float32)
    assert torch.equal(y[0], torch.zeros(2 * BLOCK)) and torch.equal(y[1, :BLOCK], torch.zeros(BLOCK))
    assert math.copysign(1, float(y[1, 0])) == -1
    assert bool(((y - x).abs() <= fp8_bound(x, stored)).all())
    # a block of tiny values keeps 2^-4 relative precision: its scale 2^-127 is clamped (amax / 448 is below it),
    # and values ~1e-30 get 2^ceil(log2(amax / 448)), inside E8M0's range
    amax = float(x[2, BLOCK:].abs().max())
    assert stored[2, 2 * BLOCK :].tolist() == [0, 127 + math.ceil(math.log2(amax / 448))]
    assert bool(((y[2] - x[2]).abs() <= x[2].abs() * 2**-4).all())
    below = torch.full((1, BLOCK), 2.0**-140)  # under 2^-136 (the smallest E4M3 step at scale 2^-127): zero
    assert (
        int(FP8_E4M3.encode(below)[0, BLOCK]) == 0
        and float(FP8_E4M3.decode(FP8_E4M3.encode(below), torch.float32).abs().max()) == 0
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fp8_refuses_non_finite_values(bad):
    x = torch.randn(3, BLOCK)
    x[1, 5] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        FP8_E4M3.encode(x)


def e4m3_value(byte: int) -> float:
    """E4M3 (fn) from its bits, independently of torch: 1 sign, 4 exponent (bias 7), 3 mantissa bits."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def test_a_256_wide_fp8_row_is_264_bytes_values_then_eight_scales():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 256, generator=gen) * torch.exp2(torch.arange(8).repeat_interleave(32) - 4.0)
    store = to_tier(create_row_store("host", 5, 256), "host", fmt="fp8")
    store.scatter(torch.tensor([3]), x)
    assert store.row_bytes == 264 and tuple(store.rows.shape) == (5, 264) and store.rows.dtype == torch.uint8
    raw = store.rows[3].numpy().tobytes()
    assert len(raw) == 264
    scales = [2.0 ** (b - 127) for b in raw[256:]]
    for b in range(8):
        amax = float(x[0, 32 * b : 32 * b + 32].abs().max())
        assert scales[b] >= amax / 448 > scales[b] / 2  # block b's scale, in byte 256 + b
    decoded = [e4m3_value(raw[j]) * scales[j // 32] for j in range(256)]
    assert decoded == store.gather(torch.tensor([3]))[0].tolist()


def test_fp8_needs_a_row_width_that_is_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        create_row_store("host", 4, 48, fmt="fp8")
    with pytest.raises(ValueError, match="multiple of 32"):
        to_tier(create_row_store("host", 4, 8), "host", fmt="fp8")


def test_bf16_round_trip_is_within_half_a_bf16_step():
    x = wide_range_rows(200, DIM)
    store = to_tier(create_row_store("host", 200, DIM), "host", fmt="bf16", dtype=torch.float32)
    store.write_range(0, x)
    y = store.gather(torch.arange(200))
    assert y.dtype == torch.float32 and store.row_bytes == 2 * DIM
    assert bool(((y - x).abs() <= x.abs() * 2**-8).all())
    assert torch.equal(y, x.to(torch.bfloat16).float())


def test_format_names_aliases_and_unknown_names():
    assert row_format("fp8") is FP8_E4M3 and row_format("bf16") is FORMATS["bfloat16"]
    assert row_format(torch.float16) is FORMATS["float16"]
    with pytest.raises(ValueError, match="unknown row format 'int4'"):
        row_format("int4")
    with pytest.raises(ValueError, match="cannot be trained"):
        check_trainable(FP8_E4M3, "this table")
    check_trainable(FORMATS["bfloat16"], "this table")


@pytest.fixture
def source():
    store = create_row_store("host", NUM_ROWS, DIM, seed=3)
    store.write_range(0, wide_range_rows(NUM_ROWS, DIM))
    return store


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "fp8_e4m3"])
def test_every_tier_gathers_identical_rows_per_format_and_saves_them_with_their_format(source, fmt, tmp_path):
    f = row_format(fmt)
    expected = f.decode(f.encode(source.read_range(0, NUM_ROWS)), torch.float32)
    stores = {
        "device": to_tier(source, "device", device="cpu", fmt=fmt, dtype=torch.float32),
        "host": to_tier(source, "host", fmt=fmt, dtype=torch.float32),
        "disk": to_tier(source, "disk", path=tmp_path / "t.rows", fmt=fmt, dtype=torch.float32),
    }
    rows = torch.tensor([0, 17, 299, 5, 17])
    for tier, store in stores.items():
        assert store.format is f and store.row_bytes == f.row_bytes(DIM), tier
        assert torch.equal(store.gather(rows), expected[rows]), tier
        assert torch.equal(store.read_range(0, NUM_ROWS), expected), tier
    assert read_disk_header(tmp_path / "t.rows")["format"] is f
    assert (tmp_path / "t.rows").stat().st_size == DISK_HEADER_BYTES + NUM_ROWS * f.row_bytes(DIM)
    stores["host"].save(tmp_path / "t.safetensors")
    for path, tier in [
        (tmp_path / "t.safetensors", "device"),
        (tmp_path / "t.safetensors", "host"),
        (tmp_path / "t.rows", None),
    ]:
        again = load_row_store(path, tier, dtype=torch.float32, **({"device": "cpu"} if tier == "device" else {}))
        assert again.format is f and torch.equal(again.read_stored(0, NUM_ROWS), stores["host"].rows)
        assert torch.equal(again.gather(rows), expected[rows])


def test_writes_encode_and_return_the_values_as_stored(source):
    store = to_tier(source, "host", fmt="fp8")
    rows = torch.tensor([4, 9])
    new = store.apply_update(rows, torch.full((2, DIM), 1e-3), scale=0.5)
    assert torch.equal(new, store.gather(rows))  # what a cache would keep equals what the next gather reads
    assert torch.equal(store.gather(rows), FP8_E4M3.decode(FP8_E4M3.encode(new), torch.float32))


def test_a_file_of_another_or_an_unknown_format_is_refused(source, tmp_path):
    to_tier(source, "disk", path=tmp_path / "t.rows", fmt="fp8")
    with pytest.raises(ValueError, match="fp8_e4m3 table, expected .* float32"):
        DiskRowStore(tmp_path / "t.rows", fmt="float32")
    head = (tmp_path / "t.rows").read_bytes()[:DISK_HEADER_BYTES]
    meta = json.loads(head[len(DISK_MAGIC) :].split(b"\n", 1)[0])
    meta["dtype"] = "fp4_e2m1"
    header = (DISK_MAGIC + json.dumps(meta).encode() + b"\n").ljust(DISK_HEADER_BYTES, b"\0")
    with open(tmp_path / "t.rows", "r+b") as f:
        f.write(header)
    with pytest.raises(ValueError, match="unknown row format 'fp4_e2m1'"):
        load_row_store(tmp_path / "t.rows")


def test_a_disk_table_created_in_fp8_is_the_encoding_of_the_initial_rows(tmp_path):
    disk = create_row_store("disk", 1000, DIM, fmt="fp8", seed=5, path=tmp_path / "t.rows")
    host = create_row_store("host", 1000, DIM, seed=5)
    assert torch.equal(disk.rows, FP8_E4M3.encode(host.read_range(0, 1000)))
    assert np.array_equal(
        np.fromfile(tmp_path / "t.rows", dtype=np.uint8, offset=DISK_HEADER_BYTES).reshape(1000, -1),
        disk.rows.numpy(),
    )
