"""Tier: multi-rank gloo (2 processes) with ``transformers`` (a pinned test dependency).

megatron_moe <-> Hugging Face Mixtral: a checkpoint trained under (TP2, EP2) exports to a sharded
Hub-layout directory that ``MixtralForCausalLM.from_pretrained`` loads, with logits equal to ours
under the training layout (< 1e-4, fp32); a randomly initialised HF Mixtral imports and matches HF's
logits under (TP2, EP2), read from transformers 5's fused-expert layout; the round trip gives
back every tensor bit for bit in the Hub's layout;
SMoE-Dropout exports at a chosen k; bad sources fail with a clear message and leave nothing behind.
"""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import check, cli, last_json, launch, megatron_moe_cmd, read_metrics
from tests.multirank._dist import launch_env, spawn

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.multirank


def convert(*args: str) -> subprocess.CompletedProcess:
    return launch(megatron_moe_cmd("convert", *args))


def _hf_logits(directory, tokens):
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _logits_worker(rank, world, ckpt, tp, ep, tokens, out):
    from megatron_moe.convert import model_io

    env = launch_env(rank, world)
    model, _, _ = model_io.load(str(ckpt), env, tp=tp, ep=ep)
    logits = model_io.logits(model, tokens)
    if rank == 0:
        torch.save(logits, out)


def _ours_under(ckpt, tp, ep, tokens, tmp_path):
    out = tmp_path / f"logits_{tp}_{ep}.pt"
    spawn(_logits_worker, max(tp, ep), ckpt, tp, ep, tokens, out)
    return torch.load(out)


@pytest.fixture(scope="module")
def trained_tp2_ep2(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_tp2ep2")
    check(cli("train", "train.steps=6", "parallel.tp=2", "parallel.ep=2",
              f"checkpoint.save={root}", nproc=2))
    return root


def test_export_loads_in_transformers_with_matching_logits(trained_tp2_ep2, tmp_path):
    out = tmp_path / "hf"
    proc = convert("--to", "hf", "--load", str(trained_tp2_ep2), "--output", str(out),
                   "--max-shard-gb", "0.0005")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json(proc)["max_logit_diff"] < 1e-4
    # the Hub's sharded layout: an index naming every tensor's shard
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert "model.layers.3.block_sparse_moe.experts.3.w3.weight" in index["weight_map"]
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    # independently of the converter: HF's logits vs ours under the training layout
    tokens = torch.randint(0, config["vocab_size"], (3, 24), generator=torch.Generator().manual_seed(7))
    theirs = _hf_logits(out, tokens)
    ours = _ours_under(trained_tp2_ep2, 2, 2, tokens, tmp_path)[..., :config["vocab_size"]]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-4


def _random_mixtral(directory, fused=False):
    """A random Mixtral saved in the Hub's layout, or (``fused``) in transformers 5's own layout
    (experts fused into gate_up_proj / down_proj, the router as mlp.gate)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = MixtralForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so every weight moves the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.15)
    model.save_pretrained(str(directory), save_original_format=not fused)


def test_import_random_mixtral_under_tp2_ep2_and_round_trip(tmp_path):
    from safetensors.torch import load_file

    source, imported, back = tmp_path / "src", tmp_path / "imported", tmp_path / "back"
    _random_mixtral(source, fused=True)  # transformers 5's layout; the Hub's is read elsewhere
    hub = tmp_path / "hub"
    _random_mixtral(hub)
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(str(source / "model.safetensors"))
    proc = convert("--to", "megatron", "--load", str(source), "--output", str(imported))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json(proc)["max_logit_diff"] < 1e-4
    tokens = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(3))
    theirs = _hf_logits(source, tokens)
    assert theirs.abs().max() > 1.0  # logits that a wrong weight would visibly change
    ours = _ours_under(imported, 2, 2, tokens, tmp_path)[..., :300]
    assert (ours - theirs).abs().max() < 1e-4
    # round trip: every tensor comes back, expert weights bit for bit
    proc = convert("--to", "hf", "--load", str(imported), "--output", str(back), "--verify", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    round_trip = last_json(proc)["round_trip"]
    assert round_trip["equal"] == round_trip["tensors"] == 2 * (7 + 4 * 3) + 3
    a, b = load_file(str(hub / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert set(a) == set(b)
    experts = [k for k in a if ".experts." in k]
    assert len(experts) == 2 * 4 * 3
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_smoe_dropout_exports_at_chosen_k(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    check(cli("train", "train.steps=3", "moe.router=smoe_dropout", f"checkpoint.save={ckpt}"))
    proc = convert("--to", "hf", "--load", str(ckpt), "--output", str(out), "--topk", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json(proc)["max_logit_diff"] < 1e-4
    assert json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 3


def _refusals(cases: dict) -> dict:
    """{name: (exit code, stderr)} of ``megatron_moe convert ARGS`` for each case, run by the CLI's
    ``main`` (what ``python -m megatron_moe`` calls) in one interpreter: a process start per
    refusal would cost more than the refusals."""
    script = """
import contextlib, io, json, sys
from megatron_moe.cli import main
out = {}
for name, args in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out[name] = [main(["convert", *args]), err.getvalue()]
print(json.dumps(out))
"""
    proc = check(launch([sys.executable, "-c", script, json.dumps(cases)]))
    return {name: tuple(v) for name, v in last_json(proc).items()}


def test_bad_sources_fail_clearly_and_leave_nothing(tmp_path, trained_tp2_ep2):
    from safetensors.torch import load_file, save_file

    empty, llama, source = tmp_path / "empty", tmp_path / "llama", tmp_path / "src"
    empty.mkdir()
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _random_mixtral(source)  # a Mixtral missing one expert weight
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w2.weight"]
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    dense = tmp_path / "dense"
    _random_llama(dense)
    got = _refusals({
        "empty": ["--to", "megatron", "--load", str(empty), "--output", str(tmp_path / "o1")],
        "llama": ["--to", "megatron", "--load", str(llama), "--output", str(tmp_path / "o2")],
        "missing": ["--to", "megatron", "--load", str(source), "--output", str(tmp_path / "o3")],
        # an existing output is not overwritten without --force
        "exists": ["--to", "hf", "--load", str(trained_tp2_ep2), "--output", str(source)],
        # upcycling with k = 1 would not reproduce the dense model
        "k1": ["--to", "megatron", "--load", str(dense), "--output", str(tmp_path / "o4"),
               "--upcycle-experts", "4", "--topk", "1"]})
    assert all(code == 2 for code, _ in got.values()), got
    assert "no config.json" in got["empty"][1]
    assert "model_type is 'llama', not 'mixtral'" in got["llama"][1]
    assert "model.layers.1.block_sparse_moe.experts.2.w2.weight is missing" in got["missing"][1]
    assert "exists and is not empty" in got["exists"][1]
    assert "--topk 1 must be between 2 and" in got["k1"][1]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers and not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3, 4))


def _random_llama(directory):
    """A dense Llama with the debug config's shape (byte vocabulary), so the upcycled MoE
    trains with the debug config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.15)
    model.save_pretrained(str(directory))
    return model.eval()


def test_upcycled_dense_llama_computes_the_dense_model_and_trains_under_ep2(tmp_path):
    source, upcycled = tmp_path / "llama", tmp_path / "upcycled"
    dense = _random_llama(source)
    proc = convert("--to", "megatron", "--load", str(source), "--output", str(upcycled),
                   "--upcycle-experts", "4", "--topk", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json(proc)["max_logit_diff"] < 1e-4  # (1,1,1) against the dense model
    tokens = torch.randint(0, 258, (3, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = dense(input_ids=tokens).logits
    assert theirs.abs().max() > 1.0
    ours = _ours_under(upcycled, 1, 2, tokens, tmp_path)[..., :258]  # EP = 2
    assert (ours - theirs).abs().max() < 1e-4
    # it trains from there under EP = 2 (the debug config has the dense model's shape)
    metrics = tmp_path / "m.jsonl"
    check(cli("train", f"checkpoint.load={upcycled}", "checkpoint.finetune=true", "parallel.ep=2",
              "train.steps=20", "logging.interval=5", f"logging.metrics_file={metrics}", nproc=2))
    losses = [row["loss"] for row in read_metrics(metrics)]
    assert len(losses) == 20 and losses[-1] < losses[0]  # (k = 1: see the refusals test)
