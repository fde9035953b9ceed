"""The goodput a core can keep at overload, given what a refusal costs it (loadtest.tools.overload)."""

from __future__ import annotations

import pytest

from loadtest.tools.overload import goodput_ceiling


def test_the_goodput_ceiling_follows_from_the_cost_of_a_refusal() -> None:
    assert goodput_ceiling(1000.0, 0.0) == 1.0  # free refusals: the whole peak
    # Refusals of a peak's worth take 10 % of the core: at 2x, g + (2 - g) x 0.1 <= 1.
    assert goodput_ceiling(1000.0, 100e-6) == pytest.approx(0.8 / 0.9)
    assert goodput_ceiling(1000.0, 100e-6, offered=3.0) == pytest.approx(0.7 / 0.9)
    assert goodput_ceiling(1000.0, 500e-6) == 0.0  # refusing the excess alone takes the core
    assert goodput_ceiling(1000.0, 2e-3) == 0.0
