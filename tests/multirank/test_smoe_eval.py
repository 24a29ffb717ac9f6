"""Tier: multi-rank gloo (1 process, spawned CLI). SMoE-Dropout's ``moe.eval_topk`` reaches every
evaluation path of one translation checkpoint: `evaluate` at k = 1 and 8 gives different losses,
`translate` at k = 1 and k = 8 gives different translations, and tools/smoe_k_sweep.py writes a CSV
(k = 1, 2, 4, 8, with BLEU/chrF: losses that differ, BLEU scores that are not all equal) that
matches `evaluate` at the same k, and a PNG. A router that ignored eval_topk would make all of them
equal. (`evaluate` runs at two k only: the sweep covers the others in one process, and it is
checked to be `evaluate` at the same k.)

The checkpoint memorises 48 short pairs (its train, valid and test data): on the bundled sample a
60-step model decodes only whitespace at every k (BLEU = chrF = 0), which could not tell k apart.
"""

import csv
import lzma
import sys

import pytest

from megatron_moe.data.corpus import default_path
from megatron_moe.data.preprocess import preprocess
from tests.conftest import (DEBUG_CONFIG, check, cli, cli_args, last_json, launch,
                            megatron_moe_cmd)

EXPERTS = 8
LANGS = ("de", "es", "fr", "it", "pt_BR", "sv")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(overrides that load the checkpoint, the pairs file): 8 short pairs per language."""
    root = tmp_path_factory.mktemp("smoe_mt")
    kept, lines = dict.fromkeys(LANGS, 0), []
    with lzma.open(default_path("test"), "rt", encoding="utf-8") as f:
        for line in f:
            lang, _, tgt = line.rstrip("\n").split("\t")
            if lang in kept and kept[lang] < 8 and len(tgt) <= 40:
                kept[lang] += 1
                lines.append(line)
    pairs = root / "pairs.tsv"
    pairs.write_text("".join(lines), encoding="utf-8")
    preprocess({"train": str(pairs), "valid": str(pairs), "test": str(pairs)}, str(root / "data"),
               vocab_size=400)
    overrides = ["data.format=translation", f"data.dir={root / 'data'}", "model.seq_length=64",
                 "data.max_new_tokens=12", "moe.router=smoe_dropout",
                 f"moe.num_experts={EXPERTS}", f"data.test_path={pairs}"]
    check(cli("train", *overrides, "train.steps=60", f"checkpoint.save={root / 'ckpt'}"))
    return overrides + [f"checkpoint.load={root / 'ckpt'}"], pairs


@pytest.fixture(scope="module")
def evaluated(trained):
    overrides, _ = trained
    return {k: last_json(check(cli("evaluate", *overrides, f"moe.eval_topk={k}")))
            for k in (1, EXPERTS)}


@pytest.mark.multirank
def test_evaluate_depends_on_eval_topk(evaluated):
    losses = [result["loss"] for result in evaluated.values()]
    assert len(set(losses)) == 2, losses
    assert max(result["bleu"] for result in evaluated.values()) > 0, evaluated
    assert evaluated[EXPERTS]["loss"] < evaluated[1]["loss"]  # trained up to k = E


@pytest.mark.multirank
def test_translate_depends_on_eval_topk(trained, tmp_path):
    overrides, pairs = trained
    sources = tmp_path / "src.tsv"
    sources.write_text("".join("\t".join(line.split("\t")[:2]) + "\n"
                               for line in pairs.read_text(encoding="utf-8").splitlines()[::4]),
                       encoding="utf-8")
    out = {k: check(launch(megatron_moe_cmd(*cli_args("translate", *overrides,
                                                      f"moe.eval_topk={k}"),
                                             "--input", str(sources)))).stdout.splitlines()
           for k in (1, EXPERTS)}
    assert len(out[1]) == len(out[EXPERTS]) == 12
    assert out[1] != out[EXPERTS]
    assert any(line.strip() for line in out[EXPERTS])


def _run(*args: str):
    """``python ARGS --config DEBUG_CONFIG`` (a tool script) through the shared launcher."""
    return launch([sys.executable, *args, "--config", DEBUG_CONFIG])


@pytest.mark.multirank
def test_sweep_writes_csv_and_png_matching_evaluate(trained, evaluated, tmp_path):
    overrides, _ = trained
    sweep = ("tools/smoe_k_sweep.py", *[a for o in overrides for a in ("--set", o)])
    ks = [1, 2, 4, EXPERTS]
    proc = check(_run(*sweep, "--k", *map(str, ks), "--csv", str(tmp_path / "k.csv"),
                      "--png", str(tmp_path / "k.png")))
    assert proc.stderr.count("[sweep] k=") == len(ks)
    with open(tmp_path / "k.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["k", "loss", "bleu", "chrf"]
    assert [int(row["k"]) for row in rows] == ks
    assert all(row["bleu"] and row["chrf"] for row in rows)
    assert len({row["loss"] for row in rows}) == len(ks)
    assert len({row["bleu"] for row in rows}) > 1, rows
    for k, result in evaluated.items():  # the sweep at k is `evaluate --set moe.eval_topk=k`
        row = rows[ks.index(k)]
        assert float(row["loss"]) == pytest.approx(result["loss"], rel=1e-9)
        assert (float(row["bleu"]), float(row["chrf"])) == (result["bleu"], result["chrf"])
    png = (tmp_path / "k.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1024
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    bad = _run(*sweep, "--set", "moe.router=topk")
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1].startswith("error: the sweep needs")
