"""Shared test settings.

Hypothesis profiles: ``ci`` (the default) keeps the suite well inside the CI
budget on two cores; ``thorough`` (HYPOTHESIS_PROFILE=thorough) digs deeper.
Deadlines are off: the engine tests run real threads on a shared machine,
and tests assert behaviour, never speed.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
