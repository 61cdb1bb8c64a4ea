"""What the calibrated mode's kernel reads under each fit of a prior file: per reused entry, the computed
features C_0..C_3 its coefficients need, and how often the prior's D and E are read.

The count follows the kernels' rule that a zero coefficient's tensor is never read
(``eoc_kernels.reference.corrected_feature``; the Triton tile loads the same way, ``_common._corrected_feature``,
so a gap such as β₃ alone reads C_2 and C_3 but not C_1): with coef = (α, β₁, γ, β₂, β₃), C_0 is always read, C_1 when
β₁ or β₂ ≠ 0, C_2 when β₂ or β₃ ≠ 0, C_3 when β₃ ≠ 0, D when α ≠ 0 and E when γ ≠ 0. It is the design's
count, not a measured bandwidth.

    python benchmarks/fit_reads.py [PRIOR]      # default: the shipped testbed prior for DDIM-20
"""

from __future__ import annotations

import argparse
import os

import torch

from eoc_dit import Prior, testbed


def reads(fit) -> dict:
    """{reused, corrected, features, delta, trend}: entry counts and the mean features / D / E share read."""
    coef = fit.coef.float()
    zero = torch.zeros(coef.shape[:-1])
    alpha, beta1, gamma = coef[..., 0], coef[..., 1], coef[..., 2]
    beta2 = coef[..., 3] if coef.shape[-1] > 3 else zero
    beta3 = coef[..., 4] if coef.shape[-1] > 4 else zero
    reused = ~fit.mask.bool()  # the mask marks the computed entries
    features = (1 + ((beta1 != 0) | (beta2 != 0)).float() + ((beta2 != 0) | (beta3 != 0)).float()
                + (beta3 != 0).float())
    return {"reused": int(reused.sum()), "corrected": int(((coef != 0).any(-1) & reused).sum()),
            "features": features[reused].mean().item(), "delta": (alpha[reused] != 0).float().mean().item(),
            "trend": (gamma[reused] != 0).float().mean().item()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prior", nargs="?", default=os.path.join(testbed.ASSETS, testbed.prior_name(20)))
    args = parser.parse_args(argv)
    for fit in Prior.load(args.prior).fits:
        r = reads(fit)
        print(f"{fit.info.get('schedule', '?')}: {r['corrected']} of {r['reused']} reused entries corrected; "
              f"{r['features']:.2f} computed features read per reused entry on average; D on {r['delta']:.0%}, "
              f"E on {r['trend']:.0%} of them")


if __name__ == "__main__":
    main()
