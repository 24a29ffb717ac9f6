"""Tier: integration (the converter as a process, one CPU process each way).

The converter streams: an 8-layer Mixtral (hundreds of MB) is imported from Hugging Face shards
into a megatron_moe checkpoint and exported back while the converter's peak resident memory stays
below three layers' tensors above a fixed overhead, and the round trip gives every tensor back bit
for bit, in fp32 and in bf16.

The fixed overhead is measured in the same test: the peak RSS of converting a 2-layer model of a
few hundred kB the same way (the interpreter, torch, megatron-core and the converter's own code;
about 0.33 GB here). The old converter held the whole model (and a second copy of its tensors).
"""

import json
import sys

import pytest
import torch

from tests.conftest import check, last_json, launch, megatron_moe_cmd

pytestmark = pytest.mark.integration

# peak RSS of a child process, measured from outside (ru_maxrss is in kB on Linux)
_PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
             "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
             "file=sys.stderr); sys.exit(code)")


def _write_mixtral(directory, layers, hidden, ffn, experts, vocab, dtype, max_shard_bytes):
    """A random Hub-layout Mixtral written with the safetensors library (not by our writer)."""
    from safetensors.torch import save_file

    directory.mkdir()
    heads, groups = 4, 2
    head = hidden // heads
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden),
                       p + "self_attn.k_proj.weight": (groups * head, hidden),
                       p + "self_attn.v_proj.weight": (groups * head, hidden),
                       p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "block_sparse_moe.gate.weight": (experts, hidden)})
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes.update({q + "w1.weight": (ffn, hidden), q + "w3.weight": (ffn, hidden),
                           q + "w2.weight": (hidden, ffn)})
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=g) * 0.05).to(dtype)
        if current and size + tensor.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensor, size + tensor.nbytes
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.nbytes for shard in shards for t in shard.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
              "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn,
              "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": groups, "num_local_experts": experts,
              "num_experts_per_tok": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config))
    layer_bytes = sum(torch.empty(s, dtype=dtype).nbytes for n, s in shapes.items()
                      if n.startswith("model.layers.0."))
    total_bytes = sum(torch.empty(s, dtype=dtype).nbytes for s in shapes.values())
    return layer_bytes, total_bytes


def _convert_measured(*args):
    """Run the converter; (its result JSON, its stderr, its peak RSS in bytes)."""
    cmd = [sys.executable, "-c", _PEAK_RSS, *megatron_moe_cmd("convert", *args)]
    proc = check(launch(cmd))
    peak = int(proc.stderr.rsplit("peak_rss_kb", 1)[1].split()[0]) * 1024
    return last_json(proc), proc.stderr, peak


def _round_trip(tmp_path, tag, dtype, **shape):
    source, imported, back = (tmp_path / f"{tag}_{x}" for x in ("src", "ckpt", "back"))
    layer_bytes, total = _write_mixtral(source, dtype=dtype, **shape)
    common = ("--verify-max-gb", "0", "--max-shard-gb", str(3 * layer_bytes / 2**30))
    result_in, err_in, peak_in = _convert_measured("--to", "megatron", "--load", str(source),
                                                   "--output", str(imported), *common)
    result_out, err_out, peak_out = _convert_measured("--to", "hf", "--load", str(imported),
                                                      "--output", str(back), *common)
    return dict(source=source, back=back, layer_bytes=layer_bytes, total=total,
                peak_in=peak_in, peak_out=peak_out, result_out=result_out,
                err=err_in + err_out, result_in=result_in)


def _assert_bit_equal(source, back):
    from safetensors.torch import load_file

    def tensors(directory):
        out = {}
        for path in sorted(directory.glob("*.safetensors")):
            out.update(load_file(str(path)))
        return out

    a, b = tensors(source), tensors(back)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streaming_round_trip_memory_and_bits(tmp_path, dtype):
    small = _round_trip(tmp_path, "small", dtype, layers=2, hidden=64, ffn=96, experts=4,
                        vocab=300, max_shard_bytes=2**20)
    big = _round_trip(tmp_path, "big", dtype, layers=8, hidden=384, ffn=1536, experts=8,
                      vocab=1000, max_shard_bytes=100 * 2**20)
    overhead = max(small["peak_in"], small["peak_out"])
    mb = 2**20
    print(f"\n{dtype}: model {big['total'] / mb:.0f} MB, layer {big['layer_bytes'] / mb:.1f} MB; "
          f"peak RSS import {big['peak_in'] / mb:.0f} MB, export {big['peak_out'] / mb:.0f} MB; "
          f"2-layer toy (overhead) import {small['peak_in'] / mb:.0f} MB, "
          f"export {small['peak_out'] / mb:.0f} MB")
    assert big["total"] > 7 * big["layer_bytes"]  # a model far larger than the allowance
    for peak in (big["peak_in"], big["peak_out"]):
        assert peak - overhead < 3 * big["layer_bytes"]
    for run in (small, big):
        _assert_bit_equal(run["source"], run["back"])
        # the converter's own proof for models too large for the logit check
        assert "logit check skipped" in run["err"]
        round_trip = run["result_out"]["round_trip"]
        assert round_trip["equal"] == round_trip["tensors"] > 0 and round_trip["differ"] == 0
    index = json.loads((big["back"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3  # written as several shards
