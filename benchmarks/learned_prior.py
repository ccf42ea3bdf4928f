"""Learned prior benchmark: does a density fitted to training geometries match the truth?

Usage:
    python benchmarks/learned_prior.py --quick     # 10,000 geometries, seconds
    python benchmarks/learned_prior.py             # 140,000 (a 200k data set's training split)

Geometries from the built-in ``ocs`` sampler (`sample_ocs`), whose density is known in
closed form (`ocs_log_prior`). `fit_learned_prior` fits a `flowrecon.density.Density` to
the internal coordinates (r1, r2, log b) of ``--train`` of them; on ``--test`` held-out
geometries the learned log-prior is compared with the analytic one:

- ``pearson`` and ``spearman``: correlations of the two log-densities (all held-out
  geometries), ``pearson_in_domain`` on those the density calls in its domain, and
  ``in_domain`` their fraction;
- ``pair_median``, ``pair_p90``: the median and 90th percentile of |(learned_i - learned_j) -
  (analytic_i - analytic_j)| over disjoint pairs, in nats: what choosing among exact
  solutions and normalised importance weights depend on;
- ``offset``: the median of learned - analytic (both are normalised, so about 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's flowrecon
from _common import environment, markdown_table, write_results  # noqa: E402

from flowrecon.base import resolve_device  # noqa: E402
from flowrecon.systems.cei.geometry import sample_ocs  # noqa: E402
from flowrecon.systems.cei.likelihood import ocs_log_prior  # noqa: E402
from flowrecon.systems.cei.prior import (  # noqa: E402
    fit_learned_prior,
    internal_coordinates,
    learned_log_prior,
)

COLUMNS = (
    "train", "epochs", "fit_s", "pearson", "spearman", "pearson_in_domain", "in_domain",
    "pair_median", "pair_p90", "offset",
)  # fmt: skip


def ranks(v: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train", type=int, default=140_000)
    ap.add_argument("--test", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--stem", default="learned_prior")
    args = ap.parse_args()
    if args.quick:
        args.train, args.stem = 10_000, "learned_prior_quick"
    device = resolve_device(args.device)
    x = sample_ocs(args.train, torch.Generator().manual_seed(0)).numpy()
    x_test = sample_ocs(args.test, torch.Generator().manual_seed(1)).numpy()
    t = time.time()
    density = fit_learned_prior(x, device=str(device), epochs=args.epochs, seed=0)
    fit_s = time.time() - t
    learned, analytic = learned_log_prior(density)(x_test), ocs_log_prior(x_test)
    inside = density.in_domain(internal_coordinates(x_test)[0])
    pairs = np.abs((learned[::2] - learned[1::2]) - (analytic[::2] - analytic[1::2]))
    row = {
        "train": args.train,
        "epochs": density.history_.epochs,
        "fit_s": fit_s,
        "pearson": float(np.corrcoef(learned, analytic)[0, 1]),
        "spearman": float(np.corrcoef(ranks(learned), ranks(analytic))[0, 1]),
        "pearson_in_domain": float(np.corrcoef(learned[inside], analytic[inside])[0, 1]),
        "in_domain": float(inside.mean()),
        "pair_median": float(np.median(pairs)),
        "pair_p90": float(np.quantile(pairs, 0.9)),
        "offset": float(np.median(learned - analytic)),
    }
    print(row, flush=True)
    env = environment(device)
    head = (
        f"Learned prior, {env['date']}, {env['device_name']}, torch {env['torch']}; ocs "
        f"sampler, {args.test:,} held-out geometries"
    )
    payload = {"environment": env, "command": " ".join(sys.argv), "settings": vars(args)}
    payload["rows"] = [row]
    out = Path(__file__).resolve().parent / "results"
    write_results(out, args.stem, payload, markdown_table(head, COLUMNS, [row]))


if __name__ == "__main__":
    main()
