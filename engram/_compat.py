"""Every use of a private torch API in engram, in one place, each with the reason no public API does the job.

A torch upgrade may rename or remove any of these; ``tests/test_compat.py`` exercises each one through the
behaviour engram relies on, so that such an upgrade fails there, loudly and by name, instead of somewhere deep in
a training run. Where a public API does the job, engram uses it instead:

* table rows in a module's state dict: ``nn.Module.register_state_dict_post_hook`` and
  ``register_load_state_dict_pre_hook`` (not ``_save_to_state_dict`` / ``_load_from_state_dict`` overrides);
* ``madvise`` on a disk table: the table maps its file with Python's :mod:`mmap` and calls ``mmap.madvise``
  (not numpy's private ``memmap._mmap``).
"""

from __future__ import annotations

import torch
from torch import nn


def tensor_version(t: torch.Tensor) -> int | None:
    """The in-place modification counter of ``t`` (``Tensor._version``), or None for an inference tensor.

    Why: a prefetch started for an ids tensor is taken by the forward called with the *same* tensor, matched by
    identity so that no device value is read; the counter tells whether the tensor was modified in place in
    between. torch has no public accessor for it. Inference tensors have no counter (reading it raises).
    """
    if t.is_inference():
        return None
    return t._version


class ConversionHookModule(nn.Module):
    """An ``nn.Module`` whose :meth:`after_conversion` runs after every ``to`` / ``cuda`` / ``to_empty`` / ``half``.

    Why: an Engram table's row offsets are constants of its head sizes, held in a buffer so that they follow the
    module to its device; ``to_empty`` (meta-device initialisation) leaves every buffer uninitialised, which would
    silently offset ids into the wrong rows. All of those conversions route through the private
    ``nn.Module._apply(fn, recurse)``; there is no public hook after a conversion.
    """

    def after_conversion(self) -> None:
        """Rebuild constant buffers (subclasses override)."""

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.after_conversion()
        return out


def ddp_ignore(model: nn.Module, names: list[str]) -> None:
    """Make a ``DistributedDataParallel`` built later around ``model`` skip the parameters/buffers ``names``.

    Why: the rows of a row-sharded table are not replicas; DDP must neither broadcast nor all-reduce them. The
    only way to exclude parameters that require grad is DDP's private static
    ``_set_params_and_buffers_to_ignore_for_model`` (FSDP2 has a public ``ignored_params``; DDP does not).
    """
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
