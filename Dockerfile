# megatron_moe on an NGC PyTorch image, which carries CUDA, NCCL, apex and TransformerEngine.
#   docker build -t megatron_moe .
#   docker run --gpus all --rm megatron_moe python -m megatron_moe train --config examples/configs/debug.yaml
FROM nvcr.io/nvidia/pytorch:25.04-py3

WORKDIR /opt/megatron_moe
COPY requirements.txt pyproject.toml README.md ./
# Keep the image's own CUDA builds of torch and numpy: install every other pinned requirement.
RUN grep -vE '^(torch|numpy)==' requirements.txt > /tmp/requirements-image.txt \
 && pip install --no-cache-dir -r /tmp/requirements-image.txt
COPY megatron_moe ./megatron_moe
COPY examples ./examples
COPY tools ./tools
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e .

CMD ["python", "-m", "megatron_moe", "--help"]
