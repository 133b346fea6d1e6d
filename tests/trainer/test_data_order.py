"""The sample order is a function of (seed, global batch, step) only: world size and resume points do not change it."""

import numpy as np
import pytest

from trainer.data import ResumableSampler, StreamOrder, day_of_year
from trainer.schedules import cosine


def global_step_positions(global_batch, micro, world, step):
    """Every position read in a global step, from each rank's sampler."""
    out = []
    for rank in range(world):
        out += ResumableSampler(global_batch=global_batch, micro_batch=micro, rank=rank,
                                world_size=world).positions(step)
    return sorted(out)


@pytest.mark.parametrize("world, micro", [(1, 8), (1, 2), (2, 4), (4, 2), (8, 1)])
def test_global_batch_is_world_size_independent(world, micro):
    for step in (0, 1, 7):
        assert global_step_positions(8, micro, world, step) == list(range(step * 8, step * 8 + 8))


def test_ranks_are_disjoint_and_resume_continues():
    a = ResumableSampler(global_batch=12, micro_batch=3, rank=1, world_size=2)
    it = iter(a)
    first = [next(it) for _ in range(5 * 6)]  # 5 steps, 6 positions per rank per step
    b = ResumableSampler(global_batch=12, micro_batch=3, rank=1, world_size=2, start_step=3)
    it = iter(b)
    assert [next(it) for _ in range(12)] == first[18:30]
    other = ResumableSampler(global_batch=12, micro_batch=3, rank=0, world_size=2)
    assert not set(other.positions(0)) & set(a.positions(0))


def test_stream_order_is_a_permutation_per_epoch():
    order = StreamOrder(10, seed=3)
    epoch0 = [order.index(p) for p in range(10)]
    epoch1 = [order.index(p) for p in range(10, 20)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1  # reshuffled
    assert epoch0 == [StreamOrder(10, seed=3).index(p) for p in range(10)]  # deterministic
    assert epoch0 != [StreamOrder(10, seed=4).index(p) for p in range(10)]


def test_indivisible_batch_is_an_error():
    with pytest.raises(ValueError, match="not divisible"):
        ResumableSampler(global_batch=8, micro_batch=3, rank=0, world_size=1)


def test_day_of_year():
    days = (np.datetime64("2021-01-01") - np.datetime64("1970-01-01")).astype(int)
    leap_dec31 = (np.datetime64("2020-12-31") - np.datetime64("1970-01-01")).astype(int)
    assert day_of_year(np.array([days, days + 40, leap_dec31])).tolist() == [0, 40, 365]


def test_cosine_schedule_endpoints():
    s = cosine(1.0, 0.1, steps=20, warmup_steps=5)
    assert len(s) == 20 and s[0] == 0.0 and s[5] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s[:6]) > 0) and np.all(np.diff(s[5:]) <= 1e-12)
    # Half-cosine midpoint: (start + end) / 2 halfway through the decay (indices 5..19 -> midpoint 12).
    assert s[12] == pytest.approx(0.55)


def test_stream_order_is_numpy_s_seeded_permutation_held_compactly():
    """The order is exactly `default_rng([seed, epoch]).permutation(n)` (so runs and resumes written before the int32
    storage read the same samples), held as int32."""
    import numpy as np

    order = StreamOrder(1000, seed=7)
    for epoch in (0, 1):
        want = np.random.default_rng([7, epoch]).permutation(1000)
        assert [order.index(epoch * 1000 + p) for p in range(1000)] == want.tolist()
    assert order._perm(0).dtype == np.int32
