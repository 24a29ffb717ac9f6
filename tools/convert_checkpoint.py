"""megatron_moe <-> Hugging Face Mixtral (same as ``python -m megatron_moe convert``).

    python tools/convert_checkpoint.py --to hf --load runs/moe/checkpoints --output hf/moe
    python tools/convert_checkpoint.py --to megatron --load hf/mixtral --output runs/imported
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_moe.cli import exit_now, main  # noqa: E402

if __name__ == "__main__":
    exit_now(main(["convert", *sys.argv[1:]]))
