"""benchmarks/fit_reads.py: the features a fit makes the kernel read follow the zero-coefficient rule."""

import torch

from benchmarks.fit_reads import reads
from eoc_dit.prior import CoefficientFit


def test_reads_count_each_entry_by_its_nonzero_coefficients():
    mask = torch.zeros(2, 1, 2, dtype=torch.bool)
    mask[0] = True  # step 0 computes both branches; step 1 reuses them
    coef = torch.zeros(2, 1, 2, 5)
    coef[0, 0, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])  # a computed entry: never counted
    coef[1, 0, 0] = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.3])  # D, and β₃: C_0, C_2, C_3
    coef[1, 0, 1] = torch.tensor([0.0, 0.2, 0.1, 0.0, 0.0])  # β₁ and E: C_0, C_1
    r = reads(CoefficientFit(mask, coef, {}))
    assert r == {"reused": 2, "corrected": 2, "features": 2.5, "delta": 0.5, "trend": 0.5}


def test_an_uncorrected_entry_reads_only_its_cached_feature():
    mask = torch.tensor([[[True, True]], [[False, False]]])
    r = reads(CoefficientFit(mask, torch.zeros(2, 1, 2, 3), {}))
    assert r == {"reused": 2, "corrected": 0, "features": 1.0, "delta": 0.0, "trend": 0.0}
