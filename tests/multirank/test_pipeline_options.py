"""Tier: multi-rank gloo (1-2 processes under torchrun). Interleaved 1F1B (``parallel.vpp``) and
``parallel.overlap_param_gather`` change how the step runs, never what it computes:

- PP=2 with 2 virtual stages trains the same losses as (1,1,1) with gating dropout on (whose draws
  are keyed by the micro-batch, counted per model chunk), evaluates a (1,1,1) checkpoint to the
  same validation loss, and its own checkpoint evaluates at (1,1,1) as it did in training;
- the distributed optimizer with overlapped gradient reduce and parameter all-gather trains the
  same losses as without overlap, and its checkpoint holds the updated weights of every rank's
  shard (the gather is completed before saving)."""

import pytest

from tests.conftest import check, cli, last_json, read_metrics

pytestmark = pytest.mark.multirank

VPP = ["parallel.pp=2", "parallel.vpp=2"]


def _losses(path) -> list[float]:
    return [row["loss"] for row in read_metrics(path)]


def test_interleaved_pipeline_trains_and_evaluates_like_one_rank(tmp_path):
    common = ["train.steps=3", "moe.gating_dropout.p=0.5",
              "moe.gating_dropout.mode=gate_expert_drop", "logging.interval=1",
              "model.init=layout_independent"]  # one model in both layouts
    ckpt, one, vpp = tmp_path / "ckpt", tmp_path / "one.jsonl", tmp_path / "vpp.jsonl"
    check(cli("train", *common, f"checkpoint.save={ckpt}", f"logging.metrics_file={one}"))
    check(cli("train", *common, *VPP, f"logging.metrics_file={vpp}",
              f"checkpoint.save={tmp_path / 'vpp_ckpt'}", nproc=2))
    assert _losses(vpp) == pytest.approx(_losses(one), abs=1e-5)
    evaluated = last_json(check(cli("evaluate", *VPP, f"checkpoint.load={ckpt}", nproc=2)))
    assert evaluated["loss"] == pytest.approx(read_metrics(one, validation=True)[-1]["valid_loss"],
                                              abs=1e-5)
    # and the other way: the checkpoint saved under virtual stages, evaluated at (1,1,1)
    back = last_json(check(cli("evaluate", f"checkpoint.load={tmp_path / 'vpp_ckpt'}")))
    assert back["loss"] == pytest.approx(read_metrics(vpp, validation=True)[-1]["valid_loss"],
                                         abs=1e-5)


def test_overlapped_param_gather_trains_the_same_and_saves_updated_weights(tmp_path):
    common = ["train.steps=4", "parallel.distributed_optimizer=true", "logging.interval=1"]
    runs = {}
    for name, extra in (("plain", []), ("overlap", ["parallel.overlap_grad_reduce=true",
                                                    "parallel.overlap_param_gather=true"])):
        metrics = tmp_path / f"{name}.jsonl"
        check(cli("train", *common, *extra, f"checkpoint.save={tmp_path / name}",
                  f"logging.metrics_file={metrics}", nproc=2))
        runs[name] = metrics
    assert _losses(runs["overlap"]) == pytest.approx(_losses(runs["plain"]), abs=1e-5)
    saved = last_json(check(cli("evaluate", f"checkpoint.load={tmp_path / 'overlap'}")))
    trained = read_metrics(runs["plain"], validation=True)[-1]["valid_loss"]
    assert saved["loss"] == pytest.approx(trained, abs=1e-5)
