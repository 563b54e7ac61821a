"""The property tier (``make test-property``): hypothesis draws inputs a user could type or a
hostile store could hold. Budgets are fixed and derandomized so that the tier takes the same
examples, and about the same time (well under two minutes), on every run."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "patchgap",
    max_examples=100,
    deadline=None,  # a shared CI machine has pauses; the budgets below bound the time instead
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("patchgap")
