"""Fused CPU kernels for one decode step: hashing the new token, and an Engram layer's retrieval + fusion.

A decode step hands every Engram op a handful of numbers (batch x width). At that size an eager torch op costs
its dispatch, not its arithmetic, and in a model the ~30 small ops of an Engram layer run with cold caches after
the blocks' matmuls: at the demo size ``benchmarks/bench_generate.py`` timed them at 0.47 ms per step, about a
tenth of the MoE backbone's step, for a few microseconds of arithmetic. Each kernel here does the same equations in one
call (numba, compiled once per machine and cached on disk; the code is in :mod:`engram.decode_kernels_numba`):

- ``hash_next_token``: compress the sampled raw ids, form every layer's n-gram mixes from the rolling
  history and take every head's prime modulus (bit-exact with :class:`~engram.hashing.NgramHasher`, which tests
  check over random configs), and roll the history;
- ``fuse_step``: gather the rows, project value and keys, gate, zero padding, normalise and convolve the
  gated value through the ShortConv ring (:class:`~engram.module.ConvRing`), add: :meth:`Engram._decode_step`'s
  output up to float rounding (the gate's and the norms' reductions accumulate in float64);
- ``hash_fuse_step``: both for one layer in one call, where :class:`~engram.model.EngramLM` leaves the hashing of
  a decode step to its Engram layers (:class:`~engram.hashing.PendingStep`); its per-step tensors are passed by
  address (checked C-contiguous CPU tensors of known shapes), and the outputs come from :class:`FreshTensors`.

They run where they apply: CPU tensors, float32 or float64, no gradients, not inside ``torch.compile``, with
numba installed (the ``cpu-kernels`` extra); everything else takes the torch path, which gives the same
results. ``ENGRAM_CPU_KERNELS=0`` or :func:`set_cpu_kernels(False) <set_cpu_kernels>` turns them off. The first
decode step of a process imports numba and loads the compiled kernels from numba's on-disk cache; the very first
on a machine compiles them (seconds). :mod:`engram.decode_kernels_numba` is imported only then.
"""

from __future__ import annotations

import math
import os
import warnings
from types import ModuleType

import numpy as np
import torch

_FALSE = {"0", "false", "no", "off"}
_enabled = os.environ.get("ENGRAM_CPU_KERNELS", "1").strip().lower() not in _FALSE
_kernels: ModuleType | bool | None = None  # the kernels' module once imported; False when numba is missing
KERNEL_DTYPES = (torch.float32, torch.float64)


def set_cpu_kernels(enabled: bool) -> None:
    """Use the fused CPU decode kernels where they apply (default: on when numba is installed)."""
    global _enabled
    _enabled = bool(enabled)


def cpu_kernels_enabled() -> bool:
    """Whether decode steps on the CPU go through the fused kernels: switched on and numba importable."""
    return _enabled and _load() is not None


def _load() -> ModuleType | None:
    global _kernels
    if _kernels is None:
        try:
            from . import decode_kernels_numba as k
        except ModuleNotFoundError as e:
            if e.name != "numba":
                raise
            _kernels = False
        except ImportError as e:  # installed but unusable (e.g. built for another numpy): say so once
            warnings.warn(f"numba is installed but does not import ({e}); decode steps use torch ops", stacklevel=3)
            _kernels = False
        else:
            _kernels = k
    return _kernels or None


def kernels() -> ModuleType:
    """:mod:`engram.decode_kernels_numba` (the kernels and :func:`~engram.decode_kernels_numba.pack_layer`); only
    call after :func:`cpu_kernels_enabled` returned True."""
    return _kernels


def as_array(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy array of a CPU tensor: a zero-copy view when it is contiguous (parameters too: the
    kernels write only their outputs), so the kernels see one array layout and compile once per dtype."""
    a = t.detach().numpy() if t.requires_grad else t.numpy()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


class FreshTensors:
    """New CPU tensors of one shape and dtype, with their addresses, for a kernel to write: cut from one allocation
    per ``block`` of them (up to 64 and 256 KiB a block), so that a decode step takes a ready tensor instead of
    allocating one (with cold caches an allocation costs more than the kernel's writes). Each tensor is handed out
    once and never written again from here, so callers may keep them; a block is freed when none of its tensors is
    referenced any more."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype
        nbytes = max(1, math.prod(self.shape) * dtype.itemsize)
        self.block = max(1, min(64, (256 << 10) // nbytes))
        self._left: list[tuple[torch.Tensor, int]] = []

    def take(self) -> tuple[torch.Tensor, int]:
        """``(tensor, tensor.data_ptr())`` of a fresh tensor."""
        if not self._left:
            views = torch.empty((self.block, *self.shape), dtype=self.dtype).unbind(0)
            self._left = [(v, v.data_ptr()) for v in reversed(views)]
        return self._left.pop()
