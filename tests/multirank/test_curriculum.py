"""Tier: multi-rank gloo (2 processes, the training command). Adaptive gating's curriculum in a
real run: from the second epoch on, the training order is the one built from the per-sample
routing statistics (summed over both data-parallel ranks), not the plain seeded order; and a run
stopped mid-epoch and resumed from its checkpoint (statistics and order saved with it) repeats
the uninterrupted run's losses."""

import pytest

from tests.conftest import check, cli, read_metrics
from tests.multirank._dist import launch_env, spawn

WORDS = "open save close file edit view help tools window print format insert table".split()


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """About 24 samples of 64 bytes: an epoch is 3 global batches of 8."""
    root = tmp_path_factory.mktemp("curriculum")
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 5))
             for i in range(60)]
    path = root / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    return root, path


def _common(path):
    return ["moe.router=adaptive", "moe.adaptive.curriculum=true", f"data.train_path={path}",
            "train.steps=12", "train.eval_iters=1", "logging.interval=1"]


def _order_worker(rank, world, path, results):
    from megatron_moe.config import load_config
    from megatron_moe.training.loop import train_step
    from megatron_moe.training.setup import setup_run
    from megatron_moe.validation import validate
    from tests.conftest import DEBUG_CONFIG

    cfg = load_config(DEBUG_CONFIG, _common(path))
    validate(cfg, world)
    run = setup_run(cfg, launch_env(rank, world), training=True)
    per_epoch = len(run.train_samples) // cfg.train.global_batch_size
    for step in range(per_epoch + 1):  # the first step of epoch 1 builds its order
        train_step(run, step)
    curriculum = run.context.sample_routing
    if rank == 0:
        results["orders"] = {e: o.tolist() for e, o in curriculum.orders.items()}
        results["plain"] = run.train_samples.order(1, cfg.train.seed).tolist()
        results["n"] = len(run.train_samples)


@pytest.mark.multirank
def test_curriculum_orders_epochs_from_routing_statistics(tiny_text):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    spawn(_order_worker, 2, str(tiny_text[1]), results)
    order = results["orders"][1]
    assert sorted(order) == list(range(results["n"]))
    assert order != results["plain"]


@pytest.mark.multirank
def test_curriculum_run_resumes_exactly(tiny_text):
    root, path = tiny_text
    full, part = root / "full.jsonl", root / "part.jsonl"
    ckpt = root / "ckpt"
    check(cli("train", *_common(path), f"logging.metrics_file={full}", f"checkpoint.save={ckpt}",
              "checkpoint.interval=5", nproc=2))
    check(cli("train", *_common(path), f"checkpoint.load={ckpt}/iter_0000005",  # mid-epoch 1
              f"logging.metrics_file={part}", nproc=2))
    expected = {r["step"]: r["loss"] for r in read_metrics(full)}
    resumed = {r["step"]: r["loss"] for r in read_metrics(part)}
    assert sorted(resumed) == list(range(6, 13))
    off = {s: (loss, expected[s]) for s, loss in resumed.items()
           if abs(loss - expected[s]) > 1e-6 * abs(expected[s])}
    assert not off, off
