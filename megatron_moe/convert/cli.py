"""``python -m megatron_moe convert``: megatron_moe <-> Hugging Face Mixtral, verified by logits.

    # megatron_moe checkpoint (saved under any TP/PP/EP) -> Hugging Face Mixtral directory
    python -m megatron_moe convert --to hf --load runs/moe/checkpoints --output hf/moe
    # Hugging Face Mixtral directory -> megatron_moe checkpoint (loads under any TP/PP/EP)
    python -m megatron_moe convert --to megatron --load hf/mixtral --output runs/imported
    # dense Hugging Face Llama/Mistral -> upcycled MoE (8 copies of each MLP, top-2), verified
    # against the dense model's logits
    python -m megatron_moe convert --to megatron --load hf/llama --output runs/upcycled \
        --upcycle-experts 8 --topk 2

Conversion runs in one CPU process and streams (:mod:`.streaming`): the model is never held in
memory, only one layer's weights at a time (export) or the weight being written (import), so a
47B-parameter Mixtral converts in a few GB of host memory. Weights keep their dtype (bf16 stays
bf16; ``--dtype`` converts on export). Both directions end with a verification on a few random
token sequences: the maximum absolute logit difference between megatron_moe and
``transformers``' Mixtral is printed (skipped with a note when ``transformers`` is not installed,
or when the model is over ``--verify-max-gb``: the check holds the model twice). An import
records every source tensor's SHA-256, and exporting that checkpoint reports how many tensors
came back bit-equal. Output is written to a
temporary directory beside ``--output`` and moved into place only when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megatron_moe.convert.mixtral import ConversionError
from megatron_moe.convert.safetensors_io import SafetensorsError
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
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="dtype of the exported safetensors (default auto: the checkpoint's)")
    p.add_argument("--tokenizer", help="SentencePiece model to ship with the export (default: "
                   "spm.model of the checkpoint's data.dir, when it exists)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    p.add_argument("--verify", type=int, default=4, metavar="N",
                   help="random sequences for the logit check (0 = skip)")
    p.add_argument("--verify-max-gb", type=float, default=4.0, metavar="GB",
                   help="skip the logit check for models larger than this in fp32 (it holds "
                        "the model twice; the conversion itself streams one layer at a time)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")


def run(args) -> int:
    from megatron_moe.runtime.distributed import single_process

    if args.upcycle_experts is not None and (args.to != "megatron" or args.upcycle_experts < 2):
        raise ConversionError(f"--upcycle-experts ({args.upcycle_experts}) needs --to megatron "
                              f"and at least 2 experts")
    env = single_process()
    with staged_directory(args.output, args.force, ConversionError) as tmp:
        if args.to == "hf":
            result = export_hf(args, env, tmp)
        else:
            result = import_hf(args, env, tmp)
    result = {"output": args.output, "max_logit_diff": None, **result}
    print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
CHECKSUMS = "source_checksums.json"  # an imported checkpoint's record of its source tensors


def export_hf(args, env, tmp: Path) -> dict:
    from megatron_moe.checkpointing.safety import read_index, verify
    from megatron_moe.convert import mixtral, model_io, streaming
    from megatron_moe.routing.registry import routing_method

    info = model_io.inspect(args.load)
    fallback = args.fallback_topk is not None
    topk = mixtral.export_topk(info.cfg, args.fallback_topk or args.topk, fallback)
    run_k = routing_method(info.cfg).export_router_k(info.cfg, topk)
    verify(info.path)  # every file against the manifest, before anything is deserialised
    stored = _stored_dtype(read_index(info.path), info.path)
    cfg = model_io.with_layout(info.cfg, precision=_PRECISION[stored])
    model = streaming.skeleton(cfg, info.vocab_size, env)
    vocab = int(info.common.get("hf_vocab_size") or info.vocab_size)
    dtype = stored if args.dtype == "auto" else getattr(torch, args.dtype)
    params = sum(t.numel() for t in streaming.weights(model).values())
    _progress(f"export {info.path} -> {args.output}: {params:,} parameters, k={topk}, "
              f"{_DTYPE_NAMES[dtype]} (stored {_DTYPE_NAMES[stored]}), one layer at a time")
    record = _checksum_record(info.path, dtype)  # hash what is written only to compare it
    digests = streaming.export_weights(info.path, cfg, model, vocab, dtype, tmp,
                                       int(args.max_shard_gb * 2**30), _progress,
                                       hashed=record is not None)
    del model
    config = mixtral.hf_config(cfg, vocab, topk, _DTYPE_NAMES[dtype])
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_tokenizer(args.tokenizer, cfg, tmp, info.path)
    result = {"round_trip": _round_trip(record, digests)}
    if fallback:
        _progress(f"verification skipped: --fallback-topk changes how '{cfg.moe.router}' routes")
    elif _verifiable(args, params):
        hf_model = _hf_model(tmp)
        if hf_model is not None:
            ours, _, _ = model_io.load(args.load, env, eval_topk=run_k)
            result["max_logit_diff"] = _compare(ours, hf_model, vocab, cfg.model.seq_length,
                                                args.verify, cfg.train.seed)
    return result


def import_hf(args, env, tmp: Path) -> dict:
    from megatron_moe.config import load_config
    from megatron_moe.convert import mixtral, model_io, streaming
    from megatron_moe.convert.hf_source import MixtralSource, Upcycle
    from megatron_moe.model.build import padded_vocab_size, params_dtype

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
    cfg = load_config(None, overrides + [
        f"model.seq_length={min(int(hf.get('max_position_embeddings', 4096)), 4096)}"])
    std = hf.get("initializer_range", 0.02)
    upcycle = Upcycle(experts, cfg.model.hidden_size, std, cfg.train.seed) if experts else None
    try:
        tensors = MixtralSource(source, upcycle)
    except SafetensorsError as e:
        raise ConversionError(str(e)) from None
    # bf16 stays bf16; fp32 stays fp32; fp16 is widened to fp32 (exactly)
    source_dtype = torch.bfloat16 if tensors.float_dtypes == {torch.bfloat16} else torch.float32
    saved = model_io.with_layout(cfg)  # the checkpoint's config: precision as configured
    cfg = model_io.with_layout(cfg, precision=_PRECISION[source_dtype])  # the stored weights'
    padded = padded_vocab_size(cfg, hf["vocab_size"])
    model = streaming.skeleton(cfg, padded, env)
    rows = {meg: (names, kind) for meg, names, kind in
            mixtral.table(cfg.model.num_layers, cfg.moe.num_experts, cfg.model.share_embeddings)}
    _check_source(tensors, streaming.hf_specs(cfg, model, hf["vocab_size"], None), source)
    dtype = params_dtype(cfg)

    def produce(name: str) -> torch.Tensor:
        names, kind = rows[name]
        parts = [tensors.read(n) for n in names]
        return mixtral.from_hf_parts(cfg, kind, parts, padded).to(dtype)

    def record_checksums(directory: Path) -> None:
        if tensors.float_dtypes != {source_dtype}:  # widened: no export gives these bytes back
            _progress(f"source dtypes {sorted(map(str, tensors.float_dtypes))} stored as "
                      f"{_DTYPE_NAMES[source_dtype]}: no SHA-256 record for a round-trip check")
            return
        record = {"source": str(source), "dtype": _DTYPE_NAMES[source_dtype],
                  "sha256": tensors.digests}
        (directory / CHECKSUMS).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")

    if experts:
        _progress(f"upcycling {source}: {experts} copies of each dense MLP, top-{cfg.moe.topk}, "
                  f"router N(0, {std}) from seed {cfg.train.seed}")
    params = sum(t.numel() for t in streaming.weights(model).values())
    _progress(f"import {source} -> {args.output}: {params:,} parameters "
              f"({_DTYPE_NAMES[dtype]}), vocabulary {hf['vocab_size']} (padded to {padded}), "
              f"one weight at a time")
    streaming.import_weights(tmp, saved, model, produce, {
        "hf_vocab_size": hf["vocab_size"], "converted_from": str(source),
        "upcycled_experts": experts or 0}, _progress, record_checksums)
    del model
    result = {}
    if _verifiable(args, params):
        hf_model = _hf_model(source)
        if hf_model is not None:
            ours, _, _ = model_io.load(str(tmp), env)
            result["max_logit_diff"] = _compare(ours, hf_model, hf["vocab_size"],
                                                cfg.model.seq_length, args.verify, cfg.train.seed)
    return result


_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _stored_dtype(index, path: Path) -> torch.dtype:
    """The dtype of the checkpoint's weights (its embedding's)."""
    meta = index.state_dict_metadata.get("embedding.word_embeddings.weight")
    dtype = getattr(getattr(meta, "properties", None), "dtype", torch.float32)
    if dtype not in _PRECISION:
        raise ConversionError(f"{path}: weights stored as {dtype}; export reads float32 or "
                              f"bfloat16 checkpoints")
    return dtype


def _check_source(tensors, expected, source: Path) -> None:
    """Every tensor the model needs is there with its shape, and nothing else is."""
    missing = [s.name for s in expected if s.name not in tensors.specs]
    if missing:
        raise ConversionError(f"{source}: tensor {missing[0]} is missing ({len(missing)} of the "
                              f"{len(expected)} tensors the model needs are)")
    for spec in expected:
        if tensors.specs[spec.name].shape != spec.shape:
            raise ConversionError(f"{source}: {spec.name} has shape "
                                  f"{tensors.specs[spec.name].shape}, the model needs {spec.shape}")
    unused = sorted(set(tensors.specs) - {s.name for s in expected} - {"lm_head.weight"})
    if unused:
        raise ConversionError(f"{source}: {len(unused)} tensors have no place in the model, e.g. "
                              f"{unused[0]} (wrong architecture?)")


def _checksum_record(checkpoint: Path, dtype: torch.dtype) -> dict | None:
    """The SHA-256 record of an imported checkpoint's source, when this export can reproduce its
    bytes (same dtype); None otherwise."""
    path = checkpoint / CHECKSUMS
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record["dtype"] != _DTYPE_NAMES[dtype]:
        _progress(f"round-trip check skipped: the source was {record['dtype']}, this export is "
                  f"{_DTYPE_NAMES[dtype]}")
        return None
    return record


def _round_trip(record: dict | None, digests: dict[str, str]) -> dict | None:
    """For a checkpoint imported from Hugging Face: how many exported tensors are bit-equal to
    the source's (every one, for an untrained import exported in the source's dtype)."""
    if record is None:
        return None
    source = record["sha256"]
    equal = [n for n in digests if source.get(n) == digests[n]]
    differ = sorted(n for n in digests if n in source and source[n] != digests[n])
    _progress(f"round trip: {len(equal)} of {len(digests)} tensors bit-equal to "
              f"{record['source']} (SHA-256 per tensor)"
              + (f"; {len(differ)} differ, e.g. {differ[0]} (trained since the import?)"
                 if differ else ""))
    return {"source": record["source"], "tensors": len(digests), "equal": len(equal),
            "differ": len(differ)}


def _verifiable(args, params: int) -> bool:
    """Whether to run the logit check: asked for, and the model (fp32, twice: ours and
    ``transformers``') small enough for ``--verify-max-gb``."""
    if not args.verify:
        return False
    gigabytes = params * 4 / 2**30
    if gigabytes > args.verify_max_gb:
        _progress(f"logit check skipped: the model is {gigabytes:.2f} GB in fp32, over "
                  f"--verify-max-gb {args.verify_max_gb:g} (the check holds the model twice); "
                  f"the conversion is checked per tensor instead (SHA-256: an export of an "
                  f"imported checkpoint reports how many tensors came back bit-equal)")
        return False
    return True


def _progress(message: str) -> None:
    print(f"[convert] {message}", file=sys.stderr, flush=True)


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
