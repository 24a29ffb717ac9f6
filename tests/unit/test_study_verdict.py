"""Unit tier: the claims table's verdicts, on seed means and on per-seed pairs
(``megatron_moe/study/report.py``: ``verdict``, ``paired_differences``, ``paired_verdict``)."""

from megatron_moe.study.plan import Claim
from megatron_moe.study.report import (RunRecords, claims_table, paired_differences,
                                       paired_verdict, verdict)


def _run(name, seed, bleu, loss=3.0, probe=None):
    record = {"summary": {"steps": 10, "total_steps": 10, "train_s": 60.0}}
    if probe is not None:
        record["machine"] = [{"probe_its_per_s": probe, "probe_median_its_per_s": probe * 0.9}]
    return RunRecords(f"{name}-s{seed}", name, seed, record, {"loss": loss, "bleu": bleu}, [])


def _claim(metric="bleu", kind="no_worse"):
    return Claim(claim="c", run="x", baseline="base", metric=metric, kind=kind)


def test_pairing_removes_a_shift_both_runs_of_a_seed_share():
    # seed 2 ran on a slower machine: both arms lose ~3 BLEU there, which inflates the seed
    # ranges; the run is ~1.4 BLEU worse on each seed
    mine = [_run("x", 1, 11.1, probe=100.0), _run("x", 2, 8.1, probe=80.0)]
    base = [_run("base", 1, 13.0, probe=101.0), _run("base", 2, 9.1, probe=82.0)]
    claim = _claim()
    assert verdict(claim, [11.1, 8.1], [13.0, 9.1])[0] == "holds"  # -1.45 within range 3.9
    pairs = paired_differences(claim, mine, base)
    assert [(s, round(d, 3), same) for s, d, same in pairs] == [(1, -1.9, True), (2, -1.0, True)]
    assert paired_verdict(claim, pairs) == "does not hold"  # mean -1.45 beyond range 0.9


def test_better_needs_the_paired_mean_beyond_the_paired_range():
    base = [_run("base", 1, 10.0), _run("base", 2, 10.0)]
    clear = [_run("x", 1, 10.8), _run("x", 2, 12.0)]  # +0.8, +2.0: mean 1.4 > range 1.2
    noisy = [_run("x", 1, 10.2), _run("x", 2, 12.0)]  # +0.2, +2.0: mean 1.1 < range 1.8
    worse = [_run("x", 1, 9.0), _run("x", 2, 8.8)]
    claim = _claim(kind="better")
    assert paired_verdict(claim, paired_differences(claim, clear, base)) == "holds"
    assert paired_verdict(claim, paired_differences(claim, noisy, base)).startswith("inconclusive")
    assert paired_verdict(claim, paired_differences(claim, worse, base)) == "does not hold"


def test_lower_is_better_metrics_and_pairs_on_other_machines():
    claim = _claim(metric="valid_loss", kind="better")
    base = [_run("base", 1, 0, loss=3.0, probe=100.0), _run("base", 2, 0, loss=3.0, probe=100.0),
            _run("base", 3, 0, loss=3.0)]
    mine = [_run("x", 1, 0, loss=2.5, probe=104.0), _run("x", 2, 0, loss=2.6, probe=70.0),
            _run("x", 3, 0, loss=2.7), _run("x", 4, 0, loss=1.0)]  # seed 4: no baseline
    pairs = paired_differences(claim, mine, base)
    assert [(s, round(d, 3), same) for s, d, same in pairs] == \
        [(1, 0.5, True), (2, 0.4, False), (3, 0.3, None)]
    assert paired_verdict(claim, pairs) == "holds"  # seeds 1 and 3: mean 0.4 > range 0.2
    assert paired_verdict(claim, pairs[1:]).startswith("inconclusive (fewer than two")

    class _Plan:
        claims = [claim]

    row = claims_table(_Plan, {"x": mine, "base": base})[2]
    assert "| s1 +0.500, s2 +0.400 (left out: machines differ), s3 +0.300? | **holds** |" in row
