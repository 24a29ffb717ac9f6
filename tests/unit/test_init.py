"""Tier: unit. The layout-independent initialisation draws each element of a tensor's global form
from (key, index) alone: any block generated on its own equals that block of the whole tensor,
and the draws are standard normal."""

import time

import numpy as np
import pytest

from megatron_moe.model.init import global_slice, normal_range


@pytest.mark.parametrize("global_shape, offset, shape", [
    ((8, 6), (0, 0), (8, 6)),          # whole
    ((8, 6), (4, 0), (4, 6)),          # rows: column-parallel shard (one contiguous run)
    ((8, 6), (0, 3), (8, 3)),          # columns: row-parallel shard (a run per row)
    ((4, 6, 10), (2, 0, 5), (1, 6, 5)),  # one expert of a stacked axis, columns split
    ((4, 6, 10), (1, 3, 0), (2, 3, 10)),  # experts and rows
    ((7,), (3,), (3,)),                # odd lengths: ranges not aligned to Philox blocks
])
def test_a_block_equals_the_same_block_of_the_whole_tensor(global_shape, offset, shape):
    whole = global_slice(1234, global_shape, (0,) * len(global_shape), global_shape)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    np.testing.assert_array_equal(global_slice(1234, global_shape, offset, shape), whole[index])


def test_draws_are_standard_normal_and_keyed():
    started = time.perf_counter()
    x = normal_range(7, 0, 1_000_000)
    per_element = (time.perf_counter() - started) / x.size
    print(f"layout-independent init: {per_element * 1e9:.0f} ns per element on this core")
    assert abs(x.mean()) < 0.005 and abs(x.std() - 1.0) < 0.005
    assert abs(np.mean(x ** 4) - 3.0) < 0.05  # normal kurtosis
    np.testing.assert_array_equal(normal_range(7, 999_997, 3), x[999_997:])
    assert not np.array_equal(normal_range(8, 0, 16), x[:16])
