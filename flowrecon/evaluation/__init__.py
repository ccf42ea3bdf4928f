"""Generic evaluation of conditional generative models: errors, coverage, SBC ranks.

System-specific metrics (CEI: atom distances, bond errors, re-simulation) live with their
system, e.g. `flowrecon.systems.cei.metrics`.
"""

from flowrecon.evaluation.metrics import (
    DEFAULT_LEVELS,
    RankTest,
    RelativeErrors,
    central_interval_coverage,
    coverage_curve,
    mse,
    nll,
    posterior_mean,
    posterior_std,
    rank_histogram_pvalue,
    rank_histogram_test,
    relative_errors,
    sbc_ranks,
    to_numpy,
)

__all__ = [
    "DEFAULT_LEVELS",
    "RankTest",
    "RelativeErrors",
    "central_interval_coverage",
    "coverage_curve",
    "mse",
    "nll",
    "posterior_mean",
    "posterior_std",
    "rank_histogram_pvalue",
    "rank_histogram_test",
    "relative_errors",
    "sbc_ranks",
    "to_numpy",
]
