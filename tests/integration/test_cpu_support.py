"""Tier: integration (a fresh interpreter per check). The CPU runtime layer: inert when CUDA is
available, and what it changes on CPU.

Each check runs in a fresh interpreter because the layer patches process-wide state.
"""

import pytest
import torch

from tests.conftest import run_python

pytestmark = pytest.mark.integration


def test_inert_when_cuda_is_available():
    out = run_python("""
        from unittest import mock
        import torch
        from torch.overrides import _get_current_function_mode_stack
        from megatron_moe.runtime import cpu_support
        before = (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.get_rng_state,
                  torch.nn.Module.cuda)
        with mock.patch.object(torch.cuda, "is_available", return_value=True):
            assert cpu_support.apply_cpu_support() is False
            assert cpu_support.distributed_backend() == "nccl"
        after = (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.get_rng_state,
                 torch.nn.Module.cuda)
        assert before == after, "CUDA entry points were replaced on a CUDA machine"
        assert not _get_current_function_mode_stack(), "a torch function mode was pushed"
        assert not cpu_support.is_applied()
        from megatron.core.tensor_parallel import mappings
        assert mappings._gather_along_first_dim.__module__ == "megatron.core.tensor_parallel.mappings"
        print("inert")
    """)
    assert "inert" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is inert where CUDA is")
def test_cpu_layer_maps_cuda_to_cpu():
    out = run_python("""
        import torch
        from megatron_moe.runtime.cpu_support import apply_cpu_support, distributed_backend
        assert apply_cpu_support() is True and apply_cpu_support() is True  # idempotent
        assert distributed_backend() == "gloo"
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
        assert torch.ones(1).cuda().device.type == "cpu"
        assert torch.ones(1).to("cuda").device.type == "cpu"
        assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.ones(1).type(torch.float64).dtype == torch.float64
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())
        # megatron's RNG tracker forks and restores the generator CPU kernels use
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        tracker = get_cuda_rng_tracker()
        tracker.add("model-parallel-rng", 123)
        torch.manual_seed(7); expected = torch.rand(3)
        torch.manual_seed(7)
        with tracker.fork():
            inside = torch.rand(3)
        after = torch.rand(3)
        torch.manual_seed(123); assert torch.equal(inside, torch.rand(3))
        assert torch.equal(after, expected)  # the default stream of numbers continued untouched
        print("mapped")
    """)
    assert "mapped" in out


def test_router_gating_runs_without_transformer_engine():
    """megatron-core 0.16.1's router GEMM names ``te_general_gemm`` even when TransformerEngine is
    absent (NameError on CPU and on an H100 alike); the fallback is applied on every device."""
    out = run_python("""
        import importlib.util
        import torch
        from megatron.core.transformer.moe import moe_utils
        from megatron_moe.runtime.te_fallback import apply_te_fallbacks
        assert importlib.util.find_spec("transformer_engine") is None, "test needs no TE"
        inp = torch.randn(3, 2, 8, requires_grad=True)
        weight = torch.randn(4, 8, requires_grad=True)
        try:
            moe_utils.router_gating_linear(inp, weight, None, torch.float32)
            raise AssertionError("megatron-core defines te_general_gemm now: drop the fallback")
        except NameError:
            pass
        apply_te_fallbacks()
        apply_te_fallbacks()  # idempotent
        logits = moe_utils.router_gating_linear(inp, weight, None, torch.float32)
        torch.testing.assert_close(logits, inp @ weight.t())
        logits.sum().backward()
        torch.testing.assert_close(weight.grad, inp.detach().reshape(-1, 8).sum(0).expand(4, 8))
        print("gated")
    """)
    assert "gated" in out


def test_megatron_imports_without_compiling_on_a_cpu_build_only():
    """Item 7: megatron's jit_fuser is a no-op and TorchInductor is never imported on a CPU-only
    torch build; torch.compile itself is left as it was. On a CUDA build nothing is installed."""
    out = run_python("""
        import sys
        import torch
        compile_ = torch.compile
        import megatron_moe  # installs the import hook before megatron is imported
        import megatron.core
        from megatron.core import jit
        def kernel(x):
            return x
        if torch.backends.cuda.is_built():
            assert jit.jit_fuser is torch.compile
        else:
            assert jit.jit_fuser(kernel) is kernel
            assert "torch._inductor.compile_fx" not in sys.modules
        assert torch.compile is compile_
        print("ok")
    """)
    assert "ok" in out
    out = run_python("""
        import sys
        from unittest import mock
        import torch
        with mock.patch.object(torch.backends.cuda, "is_built", return_value=True):
            import megatron_moe
        assert not any(type(f).__name__ == "_MegatronFinder" for f in sys.meta_path)
        print("inert")
    """)
    assert "inert" in out
