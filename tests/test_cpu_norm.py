"""The CPU's one-call RMSNorm (kernels/cpu_norm.cpp) against layers/norm.py's torch reference."""

from __future__ import annotations

import pytest
import torch

from qwen_serve.kernels import cpu_extension, cpu_norm
from qwen_serve.layers.norm import RMSNorm, rms_norm_reference
from qwen_serve.layers.options import LayerOptions

pytestmark = pytest.mark.skipif(not cpu_extension.available(), reason="the CPU kernels cannot be built here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 896), (5, 64), (2, 3, 100)], ids=["decode", "rows", "3d-odd-width"])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_matches_the_reference(dtype, shape, with_residual):
    """The sum added to the residual exactly (the same rounding of one add); the normed output within one
    rounding of its dtype (float32 sums in another order can move a value across a rounding boundary)."""
    gen = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    residual = torch.randn(*shape, generator=gen).to(dtype) if with_residual else None
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype)
    out, added = cpu_norm.rms_norm(x, residual, weight, 1e-6)
    ref_out, ref_added = rms_norm_reference(x, residual, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape and added.shape == x.shape
    assert torch.equal(added, ref_added)
    eps = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    assert (out.float() - ref_out.float()).abs().max().item() <= eps * ref_out.float().abs().amax().item()


def test_the_layer_takes_the_kernel_on_the_cpu_unless_told_not_to(monkeypatch):
    calls = []
    kernel = cpu_norm.rms_norm
    monkeypatch.setattr(cpu_norm, "rms_norm", lambda *args: calls.append(1) or kernel(*args))
    x = torch.randn(2, 64).bfloat16()
    for fused, expected in ((True, 1), (False, 1)):
        norm = RMSNorm(64, 1e-6, LayerOptions(fused_kernels=fused), params_dtype=torch.bfloat16)
        norm(x, x)
        assert len(calls) == expected
    float32_weight = RMSNorm(64, 1e-6, LayerOptions(), params_dtype=torch.float32)
    float32_weight(x, None)  # the weight's dtype differs from x's: the torch code, which promotes
    assert len(calls) == 1


def test_bad_inputs_are_refused():
    module = cpu_extension.build()
    with pytest.raises(RuntimeError, match="of the weight's width"):
        module.rms_norm(torch.randn(2, 64), None, torch.ones(32), 1e-6)
    with pytest.raises(RuntimeError, match="residual of x's dtype and shape"):
        module.rms_norm(torch.randn(2, 64), torch.randn(3, 64), torch.ones(64), 1e-6)
