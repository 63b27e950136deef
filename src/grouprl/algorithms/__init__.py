"""Pure tensor math of grouprl: advantages, policy losses, aggregations, regularizers.

Each kind of component lives in a registry and is looked up by its config name.
"""

from grouprl.algorithms.advantages import ADVANTAGES
from grouprl.algorithms.aggregation import AGGREGATIONS
from grouprl.algorithms.losses import LOSSES
from grouprl.algorithms.regularizers import REGULARIZERS

__all__ = ["ADVANTAGES", "AGGREGATIONS", "LOSSES", "REGULARIZERS"]
