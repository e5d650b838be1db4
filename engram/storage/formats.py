"""Row formats: how the values of one table row are laid out in memory and in table files.

A :class:`~engram.storage.RowStore` keeps its rows *encoded* in one of these formats, in every tier, and decodes
them on ``gather`` to its compute dtype (:attr:`RowStore.dtype`). A format is named in every table file header
(the ``dtype`` field of a disk table's header, of a safetensors table's metadata and of ``tables.json``), so a
loader always knows how to read the bytes; a name this engram does not know is refused.

* ``float32``, ``bfloat16``, ``float16``, ``float64``: the values themselves, ``dim`` elements per row.
* ``fp8_e4m3``: FP8 E4M3 values with one E8M0 (power-of-two) scale per block of 32 values, the layout
  DeepSeek-V4.1 ships its Engram tables in. A row of width D (a multiple of 32) is ``D + D / 32`` bytes::

      byte  0 .. D-1        q_0 .. q_{D-1}        E4M3 (1 sign, 4 exponent bits with bias 7, 3 mantissa bits;
                                                  no infinities, max 448)
      byte  D .. D+D/32-1   e_0 .. e_{D/32-1}     E8M0 scale of block b = values [32 b, 32 b + 32):
                                                  s_b = 2^(e_b - 127), e_b in [0, 254] (255 would be NaN)

  so a 256-wide row is 256 + 8 = 264 bytes, read as one contiguous run (one page for a disk table). Value j
  decodes to ``q_j * s_{j // 32}``.

Encoding one block x of 32 values (:meth:`Fp8BlockFormat.encode`):

    s = 2^k, k = the smallest integer with max|x| <= 448 * 2^k      (DeepSeek's "ceil" rounding of the scale)
    q = round_to_nearest_even(x / s) in E4M3

k is found exactly from the binary exponent of max|x| (``max|x| = m 2^E``, ``m`` in [0.5, 1): k = E - 9, plus 1
when m > 0.875, since 448 = 0.875 * 2^9), so ``|x / s| <= 448`` always holds and nothing saturates. k is clamped to
[-127, 127] (the E8M0 range); an all-zero block gets k = 0. Values below the smallest E4M3 step (2^-9 * s) round to
zero. Non-finite values are refused: E4M3 has no infinity, and a NaN would silently poison a row.

Error bound per element (tested): with 3 mantissa bits, a value in E4M3's normal range (|x / s| >= 2^-6) is off by
at most half a step, 2^-4 of its magnitude; below it the step is 2^-9, so the error is at most 2^-10 s::

    |decode(encode(x)) - x| <= max(2^-4 |x|, 2^-10 s)

and s < max|x| / 224 (unless k was clamped at -127), so no element is off by more than 2^-4 of its block's
largest magnitude.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 32  # values per E8M0 scale
E4M3_MAX = 448.0
_E8M0_BIAS = 127


class RowFormat:
    """How one row of ``dim`` values is stored: ``width(dim)`` elements of :attr:`storage_dtype` per row.

    ``encode(values [n, dim]) -> [n, width]`` and ``decode(stored [n, width], dtype) -> [n, dim]``.
    :attr:`trainable` says whether a row-wise optimizer may write rows in this format (see docs/offload.md).
    """

    name: str
    storage_dtype: torch.dtype
    numpy_dtype: type
    default_dtype: torch.dtype  # what a store of this format returns from gather unless told otherwise
    trainable: bool

    def check_dim(self, dim: int) -> None:
        """Raise if rows of width ``dim`` cannot be stored in this format."""

    def width(self, dim: int) -> int:
        raise NotImplementedError

    def dim_of(self, width: int) -> int:
        """The row width whose encoding is ``width`` elements."""
        raise NotImplementedError

    def row_bytes(self, dim: int) -> int:
        return self.width(dim) * torch.empty((), dtype=self.storage_dtype).element_size()

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class FloatFormat(RowFormat):
    """Rows stored as plain values of one float dtype (encode and decode are casts; a view when they agree)."""

    trainable = True

    def __init__(self, name: str, dtype: torch.dtype, numpy_dtype: type):
        self.name, self.storage_dtype, self.numpy_dtype, self.default_dtype = name, dtype, numpy_dtype, dtype

    def width(self, dim: int) -> int:
        return dim

    def dim_of(self, width: int) -> int:
        return width

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(self.storage_dtype)

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return stored.to(dtype)


class Fp8BlockFormat(RowFormat):
    """FP8 E4M3 values with one E8M0 scale per 32 values, scales after the values (module docstring)."""

    name = "fp8_e4m3"
    storage_dtype = torch.uint8
    numpy_dtype = np.uint8
    default_dtype = torch.float32
    # A row-wise Adam step moves a value by about lr (and lr decays), while E4M3 rounds to within 2^-4 of a value's
    # magnitude (coarser below its block's largest): a step is at most about one rounding error and smaller ones
    # round away, and every write would re-derive the scale of each touched block. fp8 rows serve a trained
    # table; they do not train one.
    trainable = False

    def check_dim(self, dim: int) -> None:
        if dim % BLOCK:
            raise ValueError(
                f"the {self.name} row format needs a row width that is a multiple of {BLOCK} (one E8M0 scale per "
                f"{BLOCK} values), got {dim}; use bfloat16 rows for this table, or a head_dim that is a multiple "
                f"of {BLOCK}"
            )

    def width(self, dim: int) -> int:
        self.check_dim(dim)
        return dim + dim // BLOCK

    def dim_of(self, width: int) -> int:
        if width % (BLOCK + 1):
            raise ValueError(f"{width} bytes per row is no {self.name} row (a multiple of {BLOCK + 1} bytes)")
        return width // (BLOCK + 1) * BLOCK

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        if values.dim() != 2:
            raise ValueError(f"encode takes [n, dim] rows, got shape {tuple(values.shape)}")
        n, dim = values.shape
        self.check_dim(dim)
        x = values.detach().float().reshape(n, dim // BLOCK, BLOCK)
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"cannot store NaN or infinite values in {self.name} rows (E4M3 has no infinity, and a NaN would "
                "poison every read of its row); find where the table went non-finite and fix that first"
            )
        amax = x.abs().amax(dim=2)
        mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2^exponent, mantissa in [0.5, 1)
        k = exponent - 9 + (mantissa > E4M3_MAX / 512).to(exponent.dtype)
        k = torch.where(amax == 0, torch.zeros_like(k), k).clamp_(-_E8M0_BIAS, _E8M0_BIAS)
        q = torch.ldexp(x, -k.unsqueeze(2).float()).to(torch.float8_e4m3fn)
        out = torch.empty(n, dim + dim // BLOCK, dtype=torch.uint8, device=values.device)
        out[:, :dim] = q.view(torch.uint8).reshape(n, dim)
        out[:, dim:] = (k + _E8M0_BIAS).to(torch.uint8)
        return out

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        n, dim = stored.shape[0], self.dim_of(stored.shape[1])
        q = stored[:, :dim].view(torch.float8_e4m3fn).float().view(n, dim // BLOCK, BLOCK)
        s = stored[:, dim:].view(torch.float8_e8m0fnu).float().unsqueeze(2)
        return q.mul_(s).view(n, dim).to(dtype)

    @staticmethod
    def scales(stored: torch.Tensor) -> torch.Tensor:
        """The block scales ``s_b`` ``[n, dim / 32]`` (float32) of encoded rows."""
        dim = FP8_E4M3.dim_of(stored.shape[1])
        return stored[:, dim:].view(torch.float8_e8m0fnu).float()


FP8_E4M3 = Fp8BlockFormat()
FORMATS: dict[str, RowFormat] = {
    "float32": FloatFormat("float32", torch.float32, np.float32),
    # numpy has no bfloat16: such rows are mapped as uint16 and viewed as bfloat16 by torch
    "bfloat16": FloatFormat("bfloat16", torch.bfloat16, np.uint16),
    "float16": FloatFormat("float16", torch.float16, np.float16),
    "float64": FloatFormat("float64", torch.float64, np.float64),
    FP8_E4M3.name: FP8_E4M3,
}
# short names accepted wherever a format is given by the user (configs, --format)
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": FP8_E4M3.name}


def row_format(fmt: str | torch.dtype | RowFormat, source: str = "row format") -> RowFormat:
    """The format named ``fmt`` (a name, an alias, a float dtype or a format), or a ValueError listing them."""
    if isinstance(fmt, RowFormat):
        return fmt
    if isinstance(fmt, torch.dtype):
        for f in FORMATS.values():
            if isinstance(f, FloatFormat) and f.storage_dtype == fmt:
                return f
        raise ValueError(f"{source}: {fmt} is no row format; use one of {sorted(FORMATS)}")
    name = ALIASES.get(fmt, fmt)
    if name not in FORMATS:
        raise ValueError(
            f"{source}: unknown row format {fmt!r}; this engram knows {sorted(FORMATS)} (aliases {sorted(ALIASES)})"
        )
    return FORMATS[name]


def check_trainable(fmt: RowFormat, what: str) -> None:
    """Refuse to train rows stored in ``fmt`` (see :attr:`RowFormat.trainable`), saying why."""
    if not fmt.trainable:
        raise ValueError(
            f"{what} stores its rows as {fmt.name}, which cannot be trained: a row-wise Adam step moves a value by "
            f"about lr, while FP8 E4M3 rounds to within 2^-4 of its magnitude (a step is at most about one rounding "
            f"error, smaller ones round away), and every write would re-derive the scale of each 32 values. Train "
            f"with float32 or bfloat16 rows and convert the trained model with `engram quantize --format fp8`"
        )
