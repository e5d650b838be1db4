"""Experiments from the paper on small budgets: sweeps (allocation, memory, ablations) and analyses.

- :mod:`.runner`: sweep bookkeeping -- per-point folders, resume, parallel processes, results tables.
- :mod:`.allocation`, :mod:`.memory`, :mod:`.ablation`: the points and figures of the three sweeps.
- :mod:`.logit_lens`, :mod:`.cka`, :mod:`.sensitivity`: LogitLens, linear CKA + soft alignment, Engram-off.
- :mod:`.sweeps`, :mod:`.analyze`: what ``engram sweep`` / ``engram analyze`` run.
"""

from .ablation import ablation_points, ablation_variants, allocate_dense, match_table_budget
from .allocation import allocation_points
from .cka import MinibatchCKA, hsic_unbiased, linear_cka, soft_alignment_index
from .logit_lens import logit_lens
from .memory import fit_log_slope, memory_points
from .runner import SweepPoint, load_results, run_sweep, with_seeds
from .sensitivity import BigramStats, engram_disabled, engram_off_eval, split_masks

__all__ = [
    "BigramStats",
    "MinibatchCKA",
    "SweepPoint",
    "ablation_points",
    "ablation_variants",
    "allocate_dense",
    "allocation_points",
    "engram_disabled",
    "engram_off_eval",
    "fit_log_slope",
    "hsic_unbiased",
    "linear_cka",
    "load_results",
    "logit_lens",
    "match_table_budget",
    "memory_points",
    "run_sweep",
    "soft_alignment_index",
    "split_masks",
    "with_seeds",
]
