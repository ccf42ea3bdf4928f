"""Generic evaluation of conditional generative models: errors, coverage, SBC ranks.

System-specific metrics (CEI: atom distances, bond errors, re-simulation) live with their
system, e.g. `flowrecon.systems.cei.metrics`.
"""

from flowrecon.evaluation import metrics
from flowrecon.evaluation.metrics import *  # noqa: F403  (the names in metrics.__all__)

__all__ = metrics.__all__
