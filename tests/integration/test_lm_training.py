"""Tier: integration (the real CLI, one process). The training command runs on language-model
data (``data.format=lm``: the ``lm_data`` fixture's indexed datasets, tests/conftest.py) and logs
finite losses."""

import numpy as np
import pytest

from tests.conftest import check, cli

pytestmark = pytest.mark.integration


def test_training_on_lm_data(lm_data):
    root, _, _ = lm_data
    proc = check(cli("train", "data.format=lm", f"data.dir={root / 'data'}", "train.steps=4",
                     "logging.interval=1", timeout=300))
    losses = [float(line.split("| loss ")[1].split()[0]) for line in proc.stdout.splitlines()
              if line.startswith("step ")]
    assert len(losses) == 4 and all(np.isfinite(losses))
