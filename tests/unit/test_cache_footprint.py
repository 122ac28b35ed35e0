"""The footprint figure: the lower median of a model's last readings, per device."""

from __future__ import annotations

import pytest

from earshot.cache.footprint import Footprints

MiB = 2**20


def test_first_reading_stands_alone() -> None:
    f = Footprints()
    assert f.figure("a") == {}
    assert f.record("a", {"cpu": 52 * MiB}) == {"cpu": 52 * MiB}
    assert f.readings("a") == 1


def test_outliers_under_traffic_do_not_move_the_figure() -> None:
    """tiny.en's readings in a max_models=1 storm (MiB): the figure stays within 10% of 52."""
    f = Footprints()
    figures = [
        f.record("tiny", {"cpu": int(m * MiB)})["cpu"] / MiB
        for m in (53.1, 52.9, 20.5, 59.2, 47.8, 36.0, 54.0, 38.2, 53.5, 52.8, 38.2, 50.9, 54.1)
    ]
    assert all(abs(x - 52) <= 5.2 for x in figures), figures
    assert f.readings("tiny") == 9  # only the last HISTORY count


def test_the_figure_follows_a_lasting_change() -> None:
    f = Footprints(history=5)
    for _ in range(5):
        f.record("a", {"cpu": 100})
    for _ in range(3):
        f.record("a", {"cpu": 200})
    assert f.figure("a") == {"cpu": 200}  # 3 of the last 5


def test_each_device_has_its_own_median_and_models_are_apart() -> None:
    f = Footprints()
    f.record("a", {"cpu": 10, "cuda:0": 1000})
    f.record("a", {"cpu": 30})  # no GPU reading this time (NVML delta unusable)
    f.record("a", {"cpu": 20, "cuda:0": 3000})
    f.record("b", {"cpu": 7})
    assert f.figure("a") == {"cpu": 20, "cuda:0": 1000}  # lower median of [1000, 3000]: a real reading
    assert f.figure("b") == {"cpu": 7}


def test_history_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Footprints(history=0)
