"""Pure tensor math of grouprl: advantages, policy losses, aggregations, regularizers,
token masks, sample filters and sampler/trainer mismatch corrections.

Each kind of component lives in a registry and is looked up by its config name.
"""

from grouprl.algorithms import (  # noqa: F401  (they register themselves)
    budgets,
    entropy_band,
    pairwise,
    segments,
)
from grouprl.algorithms.advantages import ADVANTAGE_MODIFIERS, ADVANTAGES
from grouprl.algorithms.aggregation import AGGREGATIONS
from grouprl.algorithms.losses import LOSSES
from grouprl.algorithms.mismatch import MISMATCH_CORRECTIONS
from grouprl.algorithms.regularizers import REGULARIZERS
from grouprl.algorithms.selection import SAMPLE_FILTERS, TOKEN_MASKS

__all__ = [
    "ADVANTAGES",
    "ADVANTAGE_MODIFIERS",
    "AGGREGATIONS",
    "LOSSES",
    "MISMATCH_CORRECTIONS",
    "REGULARIZERS",
    "SAMPLE_FILTERS",
    "TOKEN_MASKS",
]
