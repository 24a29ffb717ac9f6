# Sourced by the sbatch scripts in this folder: device, Python and container settings.
#
#   DEVICE=gpu|cpu      gpu (default): NCCL on the allocated GPUs; cpu: gloo, no GPU needed (tests)
#   PYTHON=...          interpreter (default: python, as in the NGC container)
#   CONTAINER_IMAGE=... run every task in this image with pyxis/enroot (srun --container-image);
#                       CONTAINER_MOUNTS adds mounts (the submit directory is always mounted)

DEVICE=${DEVICE:-gpu}
PYTHON=${PYTHON:-python}
case "$DEVICE" in
  gpu)
    # megatron-core's tensor/sequence-parallel overlap relies on kernels being issued in order
    # on one hardware queue: it asserts this variable is 1 when overlap is on.
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    # a rank whose NCCL collective fails raises an error instead of hanging until the timeout
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # print NCCL's warnings (ring/tree set-up failures, IB errors) without its chatty INFO lines
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # InfiniBand retry timeout (4.096 us * 2^22 ~ 17 s): survives a short fabric hiccup on big jobs
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    # the caching allocator grows segments instead of carving fixed blocks: less fragmentation
    # with MoE's variable token counts per expert (Megatron-LM's recommended setting)
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    # async NCCL collectives hold their tensors until the collective ends instead of
    # recordStream, which delays freeing memory to the next sync (torch's and Megatron's advice)
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    # If NCCL picks the wrong network interface (docker0, lo), name the right one, e.g.:
    # export NCCL_SOCKET_IFNAME=ib0
    ;;
  cpu)
    # no GPU: hide any that exist so megatron_moe takes its CPU runtime and the gloo backend
    export CUDA_VISIBLE_DEVICES=""
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    ;;
  *)
    echo "error: DEVICE must be gpu or cpu, not '$DEVICE'" >&2
    exit 2
    ;;
esac

SRUN_CONTAINER=()
if [ -n "${CONTAINER_IMAGE:-}" ]; then
  SRUN_CONTAINER=(--container-image="$CONTAINER_IMAGE" --container-workdir="$PWD"
                  --container-mounts="$PWD:$PWD${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}")
fi

log() { echo "[$(date '+%F %T')] [job ${SLURM_JOB_ID:-?}] $*"; }
