"""The Hugging Face ecosystem (``pip install 'engram[hf]'``): transformers export, lm-eval, datasets, adapters.

* :func:`export` (:mod:`engram.hf.export`): an engram model as a transformers folder with remote code.
* :mod:`engram.hf.lmeval`: lm-eval-harness on an exported model, an engram model folder, or any ready
  transformers model (:func:`~engram.hf.lmeval.evaluate_hf`), offline with the tasks in ``engram/hf/tasks``.
* Hugging Face datasets as training data live in :mod:`engram.train.hf_datasets` (the trainer reads them).
* :mod:`engram.hf.adapter`: Engram adapters on pretrained HF causal LMs (:func:`add_engram`, :func:`save_adapter`,
  :func:`load_adapter`); :mod:`engram.hf.finetune` trains them (``engram finetune``).

Only the CLI imports this package; its heavy dependencies are imported here, never by ``import engram``.
"""

from .adapter import add_engram, get_adapter, load_adapter, remove_engram, save_adapter
from .export import export

__all__ = ["add_engram", "export", "get_adapter", "load_adapter", "remove_engram", "save_adapter"]
