# megatron_moe on an NGC PyTorch image, which carries CUDA, NCCL, apex and TransformerEngine.
#   docker build -t megatron_moe:latest .
#   docker run --gpus all --rm megatron_moe:latest                    # prints the CLI help
#   docker run --gpus all --rm -v $PWD/runs:/opt/megatron_moe/runs megatron_moe:latest \
#       torchrun --nproc_per_node 8 -m megatron_moe train --config examples/configs/debug.yaml
# On a Slurm cluster with pyxis/enroot, see README "On a cluster" (CONTAINER_IMAGE=...).
# 25.11 is the newest image megatron-core 0.16.1 is tested on: its own CI builds on
# nvcr.io/nvidia/pytorch:25.11-py3 (docker/.ngc_version.dev at Megatron-LM tag core_v0.16.1; the
# LTS line uses 25.09). It has Python 3.12, for which the same megatron-core wheel installs.
FROM nvcr.io/nvidia/pytorch:25.11-py3

WORKDIR /opt/megatron_moe
COPY requirements.txt pyproject.toml README.md ./
# The image's own CUDA builds of torch and numpy stay: every other pinned requirement is installed
# under a constraint file that pins them to the versions already in the image, so no dependency can
# replace them (pip fails instead). The image's global PIP_CONSTRAINT (its whole environment) is
# left out for this install, as megatron-core's installation guide does: our pins are exact.
RUN python -m pip list --format=freeze | grep -iE '^(torch|numpy)==' > /tmp/image-constraints.txt \
 && grep -vE '^(torch|numpy)==' requirements.txt > /tmp/requirements-image.txt \
 && PIP_CONSTRAINT= python -m pip install --no-cache-dir -c /tmp/image-constraints.txt \
        -r /tmp/requirements-image.txt \
 && rm /tmp/requirements-image.txt
COPY megatron_moe ./megatron_moe
COPY examples ./examples
COPY tools ./tools
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation . \
 && useradd --create-home --uid 1000 moe \
 && mkdir -p /opt/megatron_moe/runs && chown moe /opt/megatron_moe/runs
USER moe

CMD ["python", "-m", "megatron_moe", "--help"]
