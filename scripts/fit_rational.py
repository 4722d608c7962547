"""Fit KAT's safe Pade rational (orders 5/4) to identity, GELU and SiLU.

Prints the ``RATIONAL_INIT`` block that ``src/gatelab/layers/kan.py`` stores, with each
fit's largest error on the grid. Deterministic (least squares, no random start), so a rerun
prints the same numbers::

    python scripts/fit_rational.py
"""

from __future__ import annotations

import torch

from gatelab.layers.kan import TARGETS, fit_rational, rational, second_moment


def _round(t: torch.Tensor) -> torch.Tensor:
    return torch.tensor([round(v, 10) + 0.0 for v in t.tolist()], dtype=torch.float64)


def main() -> None:
    torch.set_num_threads(1)  # fewer run-to-run round-off differences in the solves
    x = torch.linspace(-3.0, 3.0, 1000, dtype=torch.float64)
    print("RATIONAL_INIT = {")
    for name, fn in TARGETS.items():
        num, den = fit_rational(fn)
        # 10 decimal places: the SiLU system is ill-conditioned and the last digits of its
        # solution follow round-off (1e-14 between runs); the identity's 1e-18 prints as 0
        num, den = (_round(t) for t in (num, den))
        err = (rational(x.view(1, -1), num, den.view(1, -1))[0] - fn(x)).abs().max()
        gain = 1.0 / second_moment(num, den)
        print(f"    # max |F - {name}| on [-3, 3]: {float(err):.3e}; KAT gain 1/E[F^2]: {gain:.4f}")
        print(f'    "{name}": (')
        print(f"        ({', '.join(repr(v) for v in num.tolist())}),")
        print(f"        ({', '.join(repr(v) for v in den.tolist())}),")
        print("    ),")
    print("}")


if __name__ == "__main__":
    main()
