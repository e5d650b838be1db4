"""The Hugging Face ecosystem (``pip install 'engram[hf]'``): transformers export, lm-eval, datasets.

* :func:`export` (:mod:`engram.hf.export`): an engram model as a transformers folder with remote code.
* :mod:`engram.hf.lmeval`: lm-eval-harness on an exported model, an engram model folder, or any ready
  transformers model (:func:`~engram.hf.lmeval.evaluate_hf`), offline with the tasks in ``engram/hf/tasks``.
* Hugging Face datasets as training data live in :mod:`engram.train.hf_datasets` (the trainer reads them).

Only the CLI imports this package; its heavy dependencies are imported here, never by ``import engram``.
"""

from .export import export

__all__ = ["export"]
