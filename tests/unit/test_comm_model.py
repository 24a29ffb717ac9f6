"""Tier: unit. The comm model (megatron_moe/study/calibration.py, projection.py; CLI
tools/comm_model.py): calibration recovers the parameters that generated synthetic
step times, the Mixtral-8x7B projection counts the right bytes and FLOPs and its step-time ratio
is 1 at p = 0 and falls with p, and on the committed gloo bench (EP=2) a fit at p = 0 and 0.5
predicts the measured p = 0.3 step-time ratio within 10%."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.conftest import REPO

BENCH = REPO / "docs" / "results" / "comm_model" / "bench_ep2.json"


@pytest.fixture(scope="module")
def cm():
    """The model's API: megatron_moe.study.calibration and .projection (tools/comm_model.py is
    their command line)."""
    from megatron_moe.study import calibration, projection

    return SimpleNamespace(**{**vars(calibration), **vars(projection)})


def _synthetic(cm, compute, latency, bandwidth):
    """Step times the model itself gives: two settings (bytes per collective differ 4x)."""
    out = []
    for setting, per_call_bytes in (("small", 2e5), ("large", 8e5)):
        for undropped in (28, 21, 14, 7):
            n_coll, nbytes = undropped, undropped * per_call_bytes
            t = compute[setting] + n_coll * latency + nbytes / bandwidth
            out.append(cm.Measurement(setting, "synthetic", 1 - undropped / 28, n_coll, nbytes, t))
    return out


def test_calibration_recovers_known_parameters(cm):
    compute, latency, bandwidth = {"small": 0.05, "large": 0.2}, 3e-4, 2.5e8
    cal = cm.calibrate(_synthetic(cm, compute, latency, bandwidth))
    assert cal.latency_s == pytest.approx(latency, rel=1e-9)
    assert cal.bandwidth_Bps == pytest.approx(bandwidth, rel=1e-9)
    for s, c in compute.items():
        assert cal.compute_s[s] == pytest.approx(c, rel=1e-9)
    assert cal.rms_residual_s < 1e-12 and cal.notes == ()


def test_calibration_says_what_it_cannot_separate_or_clamps(cm):
    one_setting = [m for m in _synthetic(cm, {"small": 0.05, "large": 0.2}, 3e-4, 2.5e8)
                   if m.setting == "small"]
    cal = cm.calibrate(one_setting)
    assert cal.latency_s == 0.0 and "not separable" in cal.notes[0]
    for m in one_setting:  # the same predictions within the setting all the same
        assert cal.step_time(m) == pytest.approx(m.step_time_s, rel=1e-9)
    faster_with_comm = [cm.Measurement("s", "x", 0, n, n * 1e5, 1.0 - 1e-3 * n) for n in (28, 7)]
    cal = cm.calibrate(faster_with_comm)  # comm would cost negative time: clamped
    assert cal.latency_s == 0.0 and cal.bandwidth_Bps == float("inf")
    assert any("clamped" in n for n in cal.notes)


def test_bench_file_errors_name_file_and_field(cm, tmp_path):
    doc = json.loads(BENCH.read_text())
    del doc["rows"][1]["moe_calls_per_rank"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(cm.BenchFileError, match=r"bad\.json: missing field 'rows\[1\]\.moe_calls"):
        cm.load_bench(bad)
    with pytest.raises(cm.BenchFileError, match=r"no row with p = 0.7"):
        cm.select(cm.load_bench(BENCH), [0.7], str(BENCH))


def test_projection_bytes_flops_and_monotone_ratio(cm):
    s8, s64 = cm.MoEShape(), cm.MoEShape(experts=64)
    counts = cm.param_counts(s8)
    assert counts["total"] == pytest.approx(46.7e9, rel=0.002)  # Mixtral 8x7B: 46.7 B
    assert counts["active_matmul"] + counts["embedding"] == pytest.approx(12.9e9, rel=0.003)
    tokens = 4096
    # hand count: 4096 tokens x 2 experts x 4096 hidden x 2 bytes, 7/8 (63/64) to other ranks
    assert cm.a2a_bytes(s8, tokens, 8) == 4096 * 2 * 4096 * 2 * 7 / 8 == 58_720_256
    assert cm.a2a_bytes(s64, tokens, 64) == 4096 * 2 * 4096 * 2 * 63 / 64 == 66_060_288
    nvl = cm.Cluster("nvl", 8)
    assert cm.a2a_seconds(s8, nvl, tokens, cm.ASSUMPTIONS) == pytest.approx(58_720_256 / 300e9)
    ib = cm.Cluster("ib", 64)  # 56 of the 63 destinations are on other nodes, over 40 GB/s
    assert cm.a2a_seconds(s64, ib, tokens, cm.ASSUMPTIONS) == pytest.approx(
        66_060_288 * 56 / 63 / 40e9)
    rows = cm.projection([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    for name in {r["cluster"] for r in rows}:
        for band in ("assumed", "bw_half", "bw_double"):
            ratios = [r["ratio"] for r in rows if r["cluster"] == name and r["bandwidth"] == band]
            assert ratios[0] == 1.0 and all(a > b for a, b in zip(ratios, ratios[1:]))
    at = {(r["cluster"], r["bandwidth"], r["p"]): r["ratio"] for r in rows}
    ib_name, nvl_name = "EP=64, 8 nodes (IB)", "EP=8, 1 node (NVLink)"
    assert at[(ib_name, "assumed", 0.5)] < at[(nvl_name, "assumed", 0.5)]  # IB gains more
    assert at[(ib_name, "bw_half", 0.5)] < at[(ib_name, "assumed", 0.5)] \
        < at[(ib_name, "bw_double", 0.5)]


def test_committed_bench_predicts_held_out_p(cm):
    rows = cm.load_bench(BENCH)
    cal = cm.calibrate(cm.select(rows, [0.0, 0.5], str(BENCH)))
    baseline, held_out = cm.select(rows, [0.0, 0.3], str(BENCH))
    pred = cm.predict(cal, held_out, baseline)
    assert abs(pred.ratio_error) < 0.10, pred
    assert pred.predicted_ratio < 1.0 and pred.measured_ratio < 1.0
