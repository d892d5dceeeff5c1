"""
Tests for L{haikutx}.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "haikutx-ci",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("haikutx-explore", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HAIKUTX_HYPOTHESIS_PROFILE", "haikutx-ci"))
