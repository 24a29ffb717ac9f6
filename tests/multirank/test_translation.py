"""Tier: multi-rank gloo (1-2 processes). Translation end to end on a small trained checkpoint:
KV-cache greedy decoding and beam search equal decoding without the cache token for token (single
rank, EP=2 and TP=2), and the evaluate / translate commands produce BLEU tables, JSON and translations."""

import json
import subprocess
import sys

import pytest

from megatron_moe.data.corpus import default_path
from megatron_moe.data.preprocess import preprocess
from tests.conftest import REPO, check, cli
from tests.multirank._dist import launch_env, spawn


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    data, ckpt = root / "data", root / "ckpt"
    preprocess({"train": default_path("train"), "valid": default_path("valid"),
                "test": default_path("test")}, str(data), vocab_size=2000, workers=2)
    overrides = ["data.format=translation", f"data.dir={data}", "model.seq_length=64",
                 "data.max_new_tokens=12"]
    check(cli("train", *overrides, "train.steps=60", f"checkpoint.save={ckpt}"))
    return overrides + [f"checkpoint.load={ckpt}"], data


def _cache_worker(rank, world, overrides):
    import torch

    from megatron_moe.checkpointing import load_checkpoint
    from megatron_moe.config import load_config
    from megatron_moe.decoding import Limits, decode
    from megatron_moe.decoding.beam import beam_decode_batch
    from megatron_moe.training.setup import setup_run
    from tests.conftest import DEBUG_CONFIG

    cfg = load_config(DEBUG_CONFIG, overrides)
    env = launch_env(rank, world)
    run = setup_run(cfg, env, training=False, inference=True)
    load_checkpoint(cfg.checkpoint.load, cfg, run.model)
    prompts = [run.valid_samples.pair(i)[0].tolist() for i in range(0, 400, 25)]
    cached = decode(run.model, prompts, 3, 2000, Limits(max_new_tokens=12), use_cache=True)
    full = decode(run.model, prompts, 3, 2000, Limits(max_new_tokens=12), use_cache=False)
    assert cached == full
    assert sum(len(x) for x in cached) > 16  # it generated something
    limits = Limits(max_new_tokens=12, max_length_ratio=0.3, no_repeat_ngram=2)
    limited = decode(run.model, prompts, 3, 2000, limits, use_cache=True)
    assert limited == decode(run.model, prompts, 3, 2000, limits, use_cache=False)
    for prompt, out in zip(prompts, limited):
        assert len(out) <= limits.new_tokens(len(prompt))
        bigrams = list(zip(out, out[1:]))
        assert len(bigrams) == len(set(bigrams)), out
    # beam search: the cache is expanded and reordered between steps
    beam = decode(run.model, prompts, 3, 2000, limits, beam_size=4, use_cache=True)
    assert beam == decode(run.model, prompts, 3, 2000, limits, beam_size=4, use_cache=False)
    assert beam != limited  # four beams find other hypotheses than greedy for some prompts
    one = [beam_decode_batch(run.model, torch.tensor([p]), 3, 2000, limits, beam_size=1)[0]
           for p in prompts]
    assert one == limited  # one beam is greedy


@pytest.mark.multirank
@pytest.mark.parametrize("layout, world", [([], 1), (["parallel.ep=2"], 2),
                                           (["parallel.tp=2"], 2)])
def test_decoding_with_cache_equals_without(trained, layout, world):
    overrides, _ = trained
    spawn(_cache_worker, world, overrides + layout)


@pytest.mark.multirank
def test_evaluate_prints_bleu_table_and_json(trained, tmp_path):
    overrides, _ = trained
    import lzma

    with lzma.open(default_path("test"), "rt", encoding="utf-8") as src:
        lines = [line for i, line in enumerate(src) if i % 25 == 0]
    (tmp_path / "t.tsv").write_text("".join(lines), encoding="utf-8")
    proc = check(cli("evaluate", *overrides, f"data.test_path={tmp_path / 't.tsv'}"))
    result = json.loads(proc.stdout.splitlines()[-1])
    assert set(result) == {"loss", "bleu", "chrf", "per_language"}
    assert len(result["per_language"]) == 10
    assert result["per_language"]["ja"]["bleu_tokenize"] == "char"
    assert result["per_language"]["zh_CN"]["bleu_tokenize"] == "zh"
    assert "lang    pairs   BLEU   chrF" in proc.stdout


@pytest.mark.multirank
def test_translate_reads_stdin_and_rejects_pipeline_parallel(trained):
    overrides, _ = trained
    args = [sys.executable, "-m", "megatron_moe", "translate", "--config",
            "examples/configs/debug.yaml"] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run(args, input="de\tOpen file\nfr\tSave as\n", cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 2
    bad = subprocess.run(args, input="xx\tOpen file\n", cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "unknown language tag 'xx'" in bad.stderr
    pp = cli("translate", *overrides, "parallel.pp=2", nproc=2)
    assert pp.returncode != 0 and "parallel.pp > 1 is not supported" in pp.stderr
