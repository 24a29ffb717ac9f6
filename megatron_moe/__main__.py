"""``python -m megatron_moe ...``: see :mod:`megatron_moe.cli`."""

import sys

from megatron_moe.cli import main

if __name__ == "__main__":
    sys.exit(main())
