"""calibrate's argument checks that need no sampling run (the calibration maths: test_prior.py)."""

import math

import pytest

from eoc_dit import DDIMSampler, calibrate


@pytest.mark.parametrize("kwargs,needle", [
    (dict(cfg_scale=math.nan), "cfg_scale"), (dict(cfg_scale=math.inf), "cfg_scale"),
    (dict(trend_eps=math.nan), "trend_eps"), (dict(trend_eps=0.0), "trend_eps"),
    (dict(trend_eps=math.inf), "trend_eps"),
    (dict(holdout=math.nan), "holdout"),
])
def test_non_finite_settings_are_refused(tiny_dit, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        calibrate(tiny_dit, DDIMSampler(2), [0], [1, 2], progress=False, **kwargs)
    assert not hasattr(tiny_dit, "_eoc_handle")
