"""Tier: multi-rank gloo (1-2 processes under torchrun). megatron-core's MoE options as exposed in
the config, where they change behaviour: aux-loss-free expert bias moves toward balance (the most
loaded expert's bias falls) and is saved in the checkpoint; the sequence-level balancing loss
differs from the micro-batch one and is the same under (TP, EP) = (1, 1) and (2, 2) from one
checkpoint, and megatron's list form trains and logs several balancing losses; a model with
shared experts and narrow (fine-grained) experts evaluates to the same validation loss under
(1, 1, 1) and (2, 1, 2), and its export to Mixtral (which has no shared experts) is refused."""

import json

import pytest
import torch

from tests.conftest import check, cli, last_json, launch, megatron_moe_cmd, read_metrics
from tests.multirank._dist import launch_env, spawn

pytestmark = pytest.mark.multirank

BIAS = ["moe.score_function=sigmoid", "moe.expert_bias=true", "moe.aux_loss_coeff=0.0",
        "moe.expert_bias_update_rate=0.01", "logging.interval=5"]


def _bias_worker(rank, world, ckpt, overrides, out):
    from megatron_moe.checkpointing import load_checkpoint
    from megatron_moe.training.setup import setup_run
    from tests.multirank._dist import config

    cfg = config(world, overrides + [f"checkpoint.load={ckpt}"])
    run = setup_run(cfg, launch_env(rank, world), training=False)
    fresh = {n: b.clone() for n, b in run.model.named_buffers() if n.endswith("expert_bias")}
    load_checkpoint(ckpt, cfg, run.model)
    loaded = {n: b.clone() for n, b in run.model.named_buffers() if n.endswith("expert_bias")}
    assert fresh and all(float(b.abs().max()) == 0.0 for b in fresh.values())
    torch.save(loaded, out)


def test_expert_bias_moves_toward_balance_and_is_checkpointed(tmp_path):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    check(cli("train", *BIAS, "train.steps=30", f"checkpoint.save={ckpt}",
              f"logging.metrics_file={metrics}"))
    load = {}  # layer -> tokens per expert over the run
    for row in read_metrics(metrics):
        for key, value in row.get("layers", {}).items():
            layer, _, what = key.removeprefix("moe/layer").partition("/")
            if what.startswith("expert") and what.endswith("_tokens"):
                e = int(what[len("expert"):-len("_tokens")])
                load.setdefault(int(layer), [0.0] * 4)[e] += value
    spawn(_bias_worker, 1, str(ckpt), BIAS, str(tmp_path / "bias.pt"))
    biases = torch.load(tmp_path / "bias.pt")
    assert len(biases) == 4  # every MoE layer's router
    for name, bias in biases.items():
        layer = int(name.split("layers.")[1].split(".")[0]) + 1
        most, least = max(range(4), key=load[layer].__getitem__), min(range(4),
                                                                        key=load[layer].__getitem__)
        assert bias[most] < 0 < bias[least], (name, bias.tolist(), load[layer])


def test_seq_aux_loss_differs_from_aux_loss_and_is_layout_independent(base_checkpoint, tmp_path):
    common = ["train.steps=22", f"checkpoint.load={base_checkpoint}", "logging.interval=1",
              "checkpoint.load_optimizer=false"]
    values = {}
    both = ["moe.load_balancing=[seq_aux_loss, global_aux_loss]", "moe.aux_loss_coeff=[0.01, 0.02]"]
    for name, balancing, nproc, layout in (("aux", ["moe.load_balancing=aux_loss"], 1, []),
                                           ("seq", ["moe.load_balancing=seq_aux_loss"], 1, []),
                                           ("seq_tp2_ep2", ["moe.load_balancing=seq_aux_loss"], 2,
                                            ["parallel.tp=2", "parallel.ep=2"]),
                                           ("list", both, 1, [])):
        out = tmp_path / f"{name}.jsonl"
        check(cli("train", *common, *balancing, *layout, f"logging.metrics_file={out}",
                  nproc=nproc))
        values[name], values[name + "_2"] = read_metrics(out)[:2]
    assert abs(values["seq"]["aux_loss"] - values["aux"]["aux_loss"]) > 1e-4
    for key in ("aux_loss", "loss"):
        assert values["seq_tp2_ep2"][key] == pytest.approx(values["seq"][key], abs=1e-5), key
    # megatron's list form: both losses trained and logged by type (unscaled, as megatron logs)
    listed = values["list"]
    assert "aux_loss" not in listed and listed["global_aux_loss"] > 0
    assert listed["seq_aux_loss"] == pytest.approx(values["seq"]["aux_loss"], abs=1e-6)
    assert listed["loss"] == pytest.approx(values["seq"]["loss"], abs=1e-6)  # step 1: same weights
    assert abs(values["list_2"]["loss"] - values["seq_2"]["loss"]) > 1e-6  # global loss trained


def test_shared_experts_same_validation_loss_under_two_layouts(tmp_path):
    shared = ["moe.shared_expert_ffn_hidden_size=96", "moe.shared_expert_gate=true",
              "moe.ffn_hidden_size=32"]
    ckpt = tmp_path / "ckpt"
    check(cli("train", *shared, "train.steps=10", f"checkpoint.save={ckpt}"))
    losses = []
    for nproc, layout in ((1, []), (2, ["parallel.tp=2", "parallel.ep=2"])):
        out = check(cli("evaluate", *shared, *layout, f"checkpoint.load={ckpt}", nproc=nproc))
        losses.append(last_json(out)["loss"])
    assert abs(losses[0] - losses[1]) < 1e-5, losses
    assert json.dumps(losses)  # both finite numbers
    # Mixtral has no shared experts: the export refuses instead of dropping them
    proc = launch(megatron_moe_cmd("convert", "--to", "hf", "--load", str(ckpt), "--output",
                                   str(tmp_path / "hf")))
    assert proc.returncode == 2 and "Mixtral has no place for" in proc.stderr
    assert "shared_experts" in proc.stderr and not (tmp_path / "hf").exists()
