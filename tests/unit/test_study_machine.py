"""Unit tier: the study's machine probe and the report's marking of runs on machines of
another speed (``megatron_moe/study/machine.py``, ``report.speed_outliers``)."""

import torch

from megatron_moe.study import machine
from megatron_moe.study.plan import PlannedRun
from megatron_moe.study.report import RunRecords, runs_table, speed_outliers


def _run(run_id, probe):
    name, seed = run_id.split("-s")
    record = {"summary": {"steps": 10, "total_steps": 10, "train_s": 60.0, "step_time_s": 0.1}}
    if probe is not None:
        record["machine"] = [{"probe_its_per_s": probe * 2, "probe_median_its_per_s": 1.0},
                             {"probe_its_per_s": probe, "probe_median_its_per_s": probe * 0.9}]
    return RunRecords(run_id, name, int(seed), record, {"loss": 3.0, "bleu": 1.0}, [])


def test_probe_measures_on_the_given_threads_and_restores_the_count():
    before = torch.get_num_threads()
    rates = machine.probe_rates(threads=1, seconds=0.2, slices=4)
    assert len(rates) == 4 and min(rates) > 1.0 and torch.get_num_threads() == before
    seen = machine.describe(threads=1)
    assert seen["cores"] >= 1 and seen["cpu"]
    assert seen["probe_its_per_s"] >= seen["probe_median_its_per_s"] > 0  # best, median slice


def test_runs_off_the_median_speed_are_marked_and_unprobed_runs_ignored():
    earlier = _run("d-s1", None)
    earlier.record["machine"] = [{"probe_its_per_s": 50.0}]  # the first probe: shown, not used
    runs = {"a": [_run("a-s1", 100.0), _run("a-s2", 104.0)], "b": [_run("b-s1", 80.0)],
            "c": [_run("c-s1", None)], "d": [earlier]}
    median, off = speed_outliers(runs)
    assert median == 100.0 and off == {"b-s1"}  # the last start counts, 20% slower

    class _Plan:
        runs = [PlannedRun(name=n, label=n, overrides=(), seeds=(1, 2) if n == "a" else (1,))
                for n in "abcd"]

    table = "\n".join(runs_table(_Plan, runs))
    rows = {line.split(" | ")[0][2:] + line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    assert rows["b1"].endswith("| 80.0 (off) |") and rows["a2"].endswith("| 104.0 |")
    assert rows["a1"].endswith("| 100.0 |") and rows["c1"].endswith("| - | - | - |")
    assert rows["d1"].endswith("| ~50.0 |")
