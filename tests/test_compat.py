"""Each private torch API that engram/_compat.py wraps still behaves as engram relies on; a torch upgrade that
removes or changes one fails here, by name. The public replacements engram uses instead are checked too."""

import inspect
import mmap

import torch
from torch import nn

from engram import MultiHeadEmbedding
from engram._compat import ConversionHookModule, ddp_ignore, tensor_version


def test_tensor_version_counts_in_place_writes_and_is_none_for_inference_tensors():
    t = torch.zeros(3)
    before = tensor_version(t)
    assert isinstance(before, int)
    t.add_(1)
    assert tensor_version(t) == before + 1
    assert tensor_version(t + 1) == 0
    with torch.inference_mode():
        assert tensor_version(torch.zeros(3)) is None


class _Counting(ConversionHookModule):
    def __init__(self):
        super().__init__()
        self.register_buffer("b", torch.arange(3), persistent=False)
        self.conversions = 0

    def after_conversion(self):
        self.conversions += 1


def test_every_module_conversion_routes_through_the_private_apply():
    assert list(inspect.signature(nn.Module._apply).parameters) == ["self", "fn", "recurse"]
    parent = nn.Sequential(_Counting())
    child = parent[0]
    parent.to("cpu")
    parent.float()
    parent.to_empty(device="cpu")
    assert child.conversions == 3


def test_a_table_rebuilds_its_offsets_after_to_empty():
    table = MultiHeadEmbedding([3, 5, 7], 4, device="meta")
    table.to_empty(device="cpu")
    assert torch.equal(table.offsets, torch.tensor([0, 3, 8]))
    assert torch.equal(table.sizes, torch.tensor([3, 5, 7]))


def test_ddp_still_has_its_private_ignore_list_and_ddp_ignore_fills_it():
    from torch.nn.parallel import DistributedDataParallel

    assert callable(getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None))
    model = nn.Linear(2, 2)
    ddp_ignore(model, ["weight"])
    assert getattr(model, "_ddp_params_and_buffers_to_ignore", None) == ["weight"]


def test_the_public_replacements_exist():
    # state-dict hooks replace _save_to_state_dict / _load_from_state_dict overrides
    for name in ("register_state_dict_post_hook", "register_load_state_dict_pre_hook"):
        assert callable(getattr(nn.Module, name, None)), name
    # Python's mmap.madvise replaces numpy's private memmap._mmap
    assert callable(getattr(mmap.mmap, "madvise", None))
