"""``python -m megatron_moe convert``: megatron_moe <-> Hugging Face Mixtral, verified by logits.

    # megatron_moe checkpoint (saved under any TP/PP/EP) -> Hugging Face Mixtral directory
    python -m megatron_moe convert --to hf --load runs/moe/checkpoints --output hf/moe
    # Hugging Face Mixtral directory -> megatron_moe checkpoint (loads under any TP/PP/EP)
    python -m megatron_moe convert --to megatron --load hf/mixtral --output runs/imported
    # dense Hugging Face Llama/Mistral -> upcycled MoE (8 copies of each MLP, top-2), verified
    # against the dense model's logits
    python -m megatron_moe convert --to megatron --load hf/llama --output runs/upcycled \
        --upcycle-experts 8 --topk 2

Conversion runs in one CPU process in fp32 (the model is rebuilt with TP = PP = EP = 1 from the
checkpoint's own config). Both directions end with a verification on a few random token sequences:
the maximum absolute logit difference between megatron_moe and ``transformers``' Mixtral is
printed (skipped with a note when ``transformers`` is not installed). Output is written to a
temporary directory beside ``--output`` and moved into place only when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megatron_moe.convert.mixtral import ConversionError
from megatron_moe.staging import staged_directory


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="convert checkpoints: megatron_moe <-> Hugging Face Mixtral",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", choices=("hf", "megatron"), required=True,
                   help="hf: export a megatron_moe checkpoint; megatron: import a Mixtral")
    p.add_argument("--load", required=True, help="source: checkpoint dir (or its root with a "
                   "'latest' tracker) for --to hf; Hugging Face model dir for --to megatron")
    p.add_argument("--output", required=True, help="directory to create")
    p.add_argument("--topk", type=int, help="experts per token of the export (SMoE-Dropout: "
                   "the k to export at; default moe.eval_topk or k_max); with "
                   "--upcycle-experts, of the upcycled MoE (default 2)")
    p.add_argument("--upcycle-experts", type=int, metavar="E", help="--to megatron from a "
                   "dense Llama/Mistral: an MoE whose E experts are each a copy of the dense MLP "
                   "(megatron-core's upcycling), computing the dense model until trained")
    p.add_argument("--fallback-topk", type=int, metavar="K", help="THOR / adaptive gating: "
                   "export the router as a plain top-K router (routes differently!)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the exported safetensors (default float32)")
    p.add_argument("--tokenizer", help="SentencePiece model to ship with the export (default: "
                   "spm.model of the checkpoint's data.dir, when it exists)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    p.add_argument("--verify", type=int, default=4, metavar="N",
                   help="random sequences for the logit check (0 = skip)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")


def run(args) -> int:
    from megatron_moe.runtime.distributed import single_process

    if args.upcycle_experts is not None and (args.to != "megatron" or args.upcycle_experts < 2):
        raise ConversionError(f"--upcycle-experts ({args.upcycle_experts}) needs --to megatron "
                              f"and at least 2 experts")
    env = single_process()
    with staged_directory(args.output, args.force, ConversionError) as tmp:
        if args.to == "hf":
            diff = export_hf(args, env, tmp)
        else:
            diff = import_hf(args, env, tmp)
    result = {"output": args.output, "max_logit_diff": diff}
    print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
def export_hf(args, env, tmp: Path) -> float | None:
    from megatron_moe.convert import mixtral, model_io

    info = model_io.inspect(args.load)
    fallback = args.fallback_topk is not None
    topk = mixtral.export_topk(info.cfg, args.fallback_topk or args.topk, fallback)
    from megatron_moe.routing.registry import routing_method

    run_k = routing_method(info.cfg).export_router_k(info.cfg, topk)
    model, info, cfg = model_io.load(args.load, env, eval_topk=run_k)
    vocab = int(info.common.get("hf_vocab_size") or info.vocab_size)
    tensors = mixtral.to_hf(cfg, model_io.full_state_dict(model), vocab)
    dtype = getattr(torch, args.dtype)
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    _progress(f"export {info.path} -> {args.output}: {len(tensors)} tensors, "
              f"{sum(t.numel() for t in tensors.values()):,} parameters, k={topk}")
    _write_safetensors(tensors, tmp, int(args.max_shard_gb * 2**30))
    config = mixtral.hf_config(cfg, vocab, topk, args.dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_tokenizer(args.tokenizer, cfg, tmp, info.path)
    if fallback:
        _progress(f"verification skipped: --fallback-topk changes how '{cfg.moe.router}' routes")
        return None
    if not args.verify:
        return None
    hf_model = _hf_model(tmp)
    if hf_model is None:
        return None
    return _compare(model, hf_model, vocab, cfg.model.seq_length, args.verify, cfg.train.seed)


def import_hf(args, env, tmp: Path) -> float | None:
    from megatron_moe.checkpointing import save_checkpoint
    from megatron_moe.config import load_config
    from megatron_moe.convert import mixtral, model_io
    from megatron_moe.model.build import padded_vocab_size

    source = Path(args.load)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"--load {source}: no config.json (not a Hugging Face model dir)")
    hf = json.loads(config_path.read_text())
    experts = args.upcycle_experts
    if experts:
        overrides = mixtral.upcycle_overrides(hf, str(config_path), experts, args.topk or 2)
    else:
        overrides = mixtral.overrides_from_hf(hf, str(config_path))
    cfg = model_io.with_layout(load_config(None, overrides + [
        f"model.seq_length={min(int(hf.get('max_position_embeddings', 4096)), 4096)}"]))
    padded = padded_vocab_size(cfg, hf["vocab_size"])
    tensors = _read_safetensors(source)
    if experts:
        tensors = mixtral.upcycle_tensors(tensors, cfg.model.num_layers, experts,
                                          cfg.model.hidden_size, hf.get("initializer_range", 0.02),
                                          cfg.train.seed, str(source))
        _progress(f"upcycling {source}: {experts} copies of each dense MLP, top-{cfg.moe.topk}, "
                  f"router N(0, {hf.get('initializer_range', 0.02)}) from seed {cfg.train.seed}")
    state = mixtral.from_hf(cfg, tensors, padded, str(source))
    model = model_io.build(cfg, padded, env)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ConversionError(f"{source}: weights do not fit the model: missing {missing[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")
    for name, tensor in state.items():
        if model.state_dict()[name].shape != tensor.shape:
            raise ConversionError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model "
                                  f"needs {tuple(model.state_dict()[name].shape)}")
    _progress(f"import {source} -> {args.output}: {len(state)} tensors, vocabulary "
              f"{hf['vocab_size']} (padded to {padded})")
    save_checkpoint(str(tmp), 0, cfg, model, extra={"hf_vocab_size": hf["vocab_size"],
                                                    "converted_from": str(source),
                                                    "upcycled_experts": experts or 0})
    if not args.verify:
        return None
    hf_model = _hf_model(source)
    if hf_model is None:
        return None
    return _compare(model, hf_model, hf["vocab_size"], cfg.model.seq_length, args.verify,
                    cfg.train.seed)


# ---------------------------------------------------------------------------------------------
def _progress(message: str) -> None:
    print(f"[convert] {message}", file=sys.stderr, flush=True)


def _write_safetensors(tensors: dict, directory: Path, max_shard_bytes: int) -> None:
    """The Hub's layout: model.safetensors, or model-0000k-of-0000n.safetensors plus an index."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensors[name], size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = filename
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _read_safetensors(directory: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"{directory}: no model.safetensors(.index.json); only the "
                              f"safetensors format is read (no pickle files)")
    tensors = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise ConversionError(f"{path}: listed in the index but missing")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors


def _write_tokenizer(explicit: str | None, cfg, directory: Path, source: Path) -> None:
    """The SentencePiece model as ``tokenizer.json`` (ids equal to SentencePiece's, special
    symbols included) and ``tokenizer.model``, the generation settings, and for translation a
    README with the prompt format (:mod:`megatron_moe.convert.hf_tokenizer`)."""
    from megatron_moe.convert import hf_tokenizer

    meta_path = Path(cfg.data.dir) / "meta.json" if cfg.data.dir else None
    meta = json.loads(meta_path.read_text()) if meta_path and meta_path.is_file() else {}
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConversionError(f"--tokenizer {explicit} does not exist")
    elif cfg.data.dir and (Path(cfg.data.dir) / meta.get("tokenizer", "spm.model")).is_file():
        path = Path(cfg.data.dir) / meta.get("tokenizer", "spm.model")
    else:
        _progress("no tokenizer found (byte-level data, or data.dir not on this machine): none "
                  "written; pass --tokenizer PATH to ship one")
        return
    shipped = hf_tokenizer.write(str(path), meta, cfg, directory, str(source))
    _progress(f"tokenizer {path} -> {shipped}; generation_config.json")


def _hf_model(directory: Path):
    """The directory's model in ``transformers`` (Mixtral, or the dense model upcycled from)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        _progress("verification skipped: transformers is not installed "
                  "(pip install transformers==5.24.0)")
        return None
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


@torch.no_grad()
def _compare(model, hf_model, vocab: int, seq_length: int, count: int, seed: int) -> float:
    from megatron_moe.convert.model_io import logits

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (count, min(seq_length, 32)), generator=g)
    ours = logits(model, tokens)[..., :vocab]
    theirs = hf_model(input_ids=tokens).logits.float()[..., :vocab]
    diff = float((ours - theirs).abs().max())
    _progress(f"verified on {count} random sequences of {tokens.shape[1]} tokens: max |logit "
              f"difference| = {diff:.3e}")
    return diff
