"""Tier: unit. Adaptive gating's curriculum order (METHODS.md §4): a deterministic function of
(seed, epoch, statistics), samples without two-expert tokens first, then by descending cosine
similarity of their per-layer two-expert fractions to the anchor; different from the plain order."""

import numpy as np

from megatron_moe.routing.curriculum import curriculum_order


def _tables(n=40, layers=4, seed=0):
    g = np.random.default_rng(seed)
    tokens = g.integers(10, 60, size=(n, layers)).astype(float)
    two = np.floor(tokens * g.random((n, layers)) ** 2)
    two[:5] = 0.0  # five samples with every token on one expert
    return two, tokens


def test_order_is_deterministic_in_seed_and_epoch_and_differs_from_plain():
    two, tokens = _tables()
    order = curriculum_order(two, tokens, seed=1, epoch=1)
    assert sorted(order.tolist()) == list(range(40))  # a permutation
    assert np.array_equal(order, curriculum_order(two, tokens, seed=1, epoch=1))
    plain = np.random.default_rng([1, 1]).permutation(40)  # PackedSamples.order(1, 1)
    assert not np.array_equal(order, plain)
    # only ties (e.g. the five zero vectors) are ordered by (seed, epoch)
    other = curriculum_order(two, tokens, seed=2, epoch=3)
    frac, total = two / tokens, two.sum(axis=1)
    a = frac[int(np.argmin(np.where(total > 0, total, np.inf)))]
    sim = np.where(total > 0, frac @ a / (np.linalg.norm(frac, axis=1) * np.linalg.norm(a)), 9)
    assert np.array_equal(sim[order], sim[other])
    assert not np.array_equal(order[:5], other[:5])


def test_zero_vectors_first_then_descending_similarity_to_the_anchor():
    two, tokens = _tables()
    order = curriculum_order(two, tokens, seed=1, epoch=1)
    assert set(order[:5].tolist()) == set(range(5))
    frac = two / tokens
    total = two.sum(axis=1)
    anchor = int(np.argmin(np.where(total > 0, total, np.inf)))
    assert order[5] == anchor  # the most similar to itself
    a = frac[anchor]
    sim = frac @ a / (np.linalg.norm(frac, axis=1) * np.linalg.norm(a))
    assert np.all(np.diff(sim[order[5:]]) <= 1e-12)


def test_no_statistics_gives_the_seeded_tie_break_order():
    two, tokens = np.zeros((10, 2)), np.zeros((10, 2))
    assert np.array_equal(curriculum_order(two, tokens, 1, 1),
                          np.random.default_rng([1, 1, 0xC0DE]).permutation(10))
