"""``python -m megatron_moe ...``: see :mod:`megatron_moe.cli`."""

from megatron_moe.cli import entry

if __name__ == "__main__":
    entry()
