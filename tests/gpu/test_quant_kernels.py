"""The dequantize-matmul kernels (kernels/quant_linear.py) against their torch reference, for the three
paths (the GEMV at one row; the codes in a tensor-core dot up to MM_MAX_ROWS rows, split along K or not;
dequantize + cuBLAS beyond), 4 and 8 bits, the group sizes of AWQ, GPTQ and GGUF, and the Qwen2.5-7B shapes.
As tests/gpu/test_kernels.py: on CUDA, or in Triton's interpreter with TRITON_INTERPRET=1 (float16, small
shapes). Error measure ||out - ref|| / ||ref|| against the float32 reference on the CPU; outputs poisoned first.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from qwen_serve.kernels import quant_linear as ql  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [] if INTERPRETED else [pytest.mark.gpu]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16] if INTERPRETED else [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
SHAPES = [(48, 256)] if INTERPRETED else [(4608, 3584), (3584, 18944), (200, 384)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    assert not torch.isnan(out).any(), "NaN in output (an element was never written?)"
    return ((out - ref).norm() / ref.norm()).item()


@functools.lru_cache(maxsize=None)
def random_packed(n: int, k: int, bits: int, group: int, seed: int, min_form: bool = False):
    """AWQ/GPTQ's form (uint8 zero points, float16 scales) or GGUF's min form (float32 scales and minimums)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    if min_form:
        scales = torch.rand(n, k // group, generator=g) * 0.01 + 0.001
        return ql.pack_codes(codes, bits), scales * torch.randint(0, 2**bits, scales.shape, generator=g), scales
    zeros = torch.randint(0, 2**bits, (n, k // group), generator=g).to(torch.uint8)
    scales = (torch.rand(n, k // group, generator=g) * 0.01 + 0.001).half()
    return ql.pack_codes(codes, bits), zeros, scales


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_layout(bits):
    """Code j of a chunk's word w is the chunk's input j * CHUNK_WORDS + w, in bits j * bits of the word."""
    per_word, chunk = 32 // bits, ql.chunk_inputs(bits)
    codes = torch.randint(0, 2**bits, (7, 3 * chunk), generator=torch.Generator().manual_seed(bits))
    packed = ql.pack_codes(codes, bits)
    assert packed.shape == (7, 3 * chunk // per_word) and packed.dtype == torch.int32
    for n, c, j, w in [(0, 0, 0, 0), (3, 1, per_word - 1, 2), (6, 2, 1, ql.CHUNK_WORDS - 1)]:
        word = int(packed[n, c * ql.CHUNK_WORDS + w]) & 0xFFFFFFFF
        assert (word >> (j * bits)) & (2**bits - 1) == codes[n, c * chunk + j * ql.CHUNK_WORDS + w]
    assert torch.equal(ql.unpack_codes(packed, bits), codes.int())
    with pytest.raises(ValueError, match=f"chunks of {chunk}"):
        ql.pack_codes(codes[:, : chunk - per_word], bits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group,min_form", [(4, 32, False), (4, 128, False), (8, 128, False), (4, -1, False),
                                                 (4, 32, True), (8, 16, True), (8, 32, True)])
@pytest.mark.parametrize("rows", [1, 3, 17, 64, 129])
@pytest.mark.parametrize("shape", SHAPES)
def test_quant_linear_matches_reference(shape, rows, bits, group, min_form, dtype):
    n, k = shape
    group = k if group == -1 else group
    if k % group:
        pytest.skip("group does not divide K")
    qweight, zeros, scales = random_packed(n, k, bits, group, seed=n, min_form=min_form)  # shared by rows, dtypes
    g = torch.Generator().manual_seed(k + rows)
    x = torch.randn(rows, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if rows % 2 else None
    dev = [t.to(DEVICE) for t in (x, qweight, zeros, scales)]
    # The reference in float32 where the kernel runs (CUDA matmuls in full float32: TF32 is off by default);
    # on the CPU it took most of this file's time at the 7B shapes.
    ref = ql.linear_reference(dev[0].float(), *dev[1:], group, bits, None if bias is None else bias.float().to(DEVICE))
    if DEVICE == "cuda":
        torch.empty(64 << 20, dtype=torch.float32, device=DEVICE).fill_(float("nan"))
    out = ql.quant_linear(*dev, group, bits, None if bias is None else bias.to(DEVICE))
    assert out.shape == (rows, n) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("bits,min_form", [(4, False), (8, True)])
@pytest.mark.parametrize("rows", [1, 17])
def test_quant_linear_in_float32_is_not_tf32(rows, bits, min_form):
    """float32 models (the engine tests that compare greedy tokens with a dequantized model's) multiply in
    full float32: TF32's 10-bit mantissa would leave ~1e-3."""
    n, k = (48, 256) if INTERPRETED else (200, 384)
    qweight, zeros, scales = random_packed(n, k, bits, 32, seed=n, min_form=min_form)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    ref = ql.linear_reference(x.double(), qweight, zeros, scales, 32, bits)
    out = ql.quant_linear(*(t.to(DEVICE) for t in (x, qweight, zeros, scales)), 32, bits)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("bits,min_form", [(4, False), (8, False), (4, True), (8, True)])
def test_dequantize_kernel_is_exact(bits, min_form):
    qweight, zeros, scales = random_packed(300, 512, bits, 128, seed=bits, min_form=min_form)
    ref = ql.dequantize_reference(qweight, zeros, scales, 128, bits)
    out = ql.dequantize(qweight.to(DEVICE), zeros.to(DEVICE), scales.to(DEVICE), 128, bits, torch.float32)
    if min_form:
        # q * s - m may be one fused multiply-add on the GPU: torch rounds q * s first, an error of up to half
        # an ulp of q * s, which is absolute (the result may cancel to ~0: 1.19e-7 seen at 8 bits, run 35).
        ulp = torch.finfo(torch.float32).eps * (ref.abs().max() + scales.abs().max() * (2**bits - 1))
        torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=ulp.item())
    else:
        assert torch.equal(out.cpu(), ref)


@pytest.mark.skipif(INTERPRETED, reason="torch's int4 packing is a CUDA kernel, not Triton")
@pytest.mark.parametrize("group,min_form", [(32, False), (128, False), (32, True)])
@pytest.mark.parametrize("rows", [1, 4, 17, 200, 300])
@pytest.mark.parametrize("shape", [(4608, 3584), (3584, 18944), (256, 384)])
def test_int4pack_matches_reference(shape, rows, group, min_form):
    """int4pack.linear on CUDA as served (each of its three paths by the row count), from torch's own packing,
    against the float32 reference of the same codes with scale and zero rounded to bfloat16 as packing does:
    what remains is bfloat16's rounding of x, of the weights where a path rounds them, and of the output
    (relative ~2e-3 each) and the order of accumulation."""
    from qwen_serve.kernels import int4pack

    n, k = shape
    assert int4pack.supported(group, k, n, torch.bfloat16, torch.device(DEVICE))
    qweight, zeros, scales = random_packed(n, k, 4, group, seed=n, min_form=min_form)
    codes = ql.unpack_codes(qweight, 4)
    packed, scales_zeros = int4pack.pack(codes.to(DEVICE), zeros.to(DEVICE), scales.to(DEVICE), torch.bfloat16)
    s, z = (t.float().cpu().t().repeat_interleave(group, dim=1) for t in scales_zeros.unbind(-1))
    weight = (codes.float() - 8) * s + z
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16()
    bias = torch.randn(n).bfloat16()
    out = int4pack.linear(x.to(DEVICE), packed, group, scales_zeros, bias.to(DEVICE))
    ref = x.float() @ weight.t() + bias.float()
    assert rel_err(out, ref) < 8e-3
    exact = ql.linear_reference(x.float(), qweight, zeros, scales, group, 4, bias.float())
    assert rel_err(out, exact) < 1e-2  # and the rounding of scale and zero costs no more than bfloat16 weights would


@pytest.mark.parametrize("tiles", [2, 8])
def test_int4pack_dequantize_kernel_is_its_reference(tiles):
    """The Triton pass that serves more than int4pack.MM_ROWS_MAX rows reads every nibble where the torch
    reference does (arbitrary words, so every bit pattern of the layout). In float32, up to the last bit:
    the GPU fuses (q - 8) * scale + zero into one multiply-add, the reference rounds twice."""
    from qwen_serve.kernels import int4pack

    n, k, group = (16, 256, 32) if INTERPRETED else (4608, 3584, 128)
    g = torch.Generator().manual_seed(tiles)
    packed = torch.randint(-2**31, 2**31 - 1, (n // 8, k // (16 * tiles), 32, tiles // 2), generator=g,
                           dtype=torch.int32)
    scales_zeros = torch.randn(k // group, n, 2, generator=g)
    out = int4pack.dequantize(packed.to(DEVICE), scales_zeros.to(DEVICE), group)
    torch.testing.assert_close(out.cpu(), int4pack.dequantize_reference(packed, scales_zeros, group),
                               rtol=2e-7, atol=1e-6)


@pytest.mark.parametrize("words", [1, 4])
@pytest.mark.parametrize("group,min_form", [(32, False), (128, False), (256, False), (32, True)])
@pytest.mark.parametrize("shape", [(48, 256)] if INTERPRETED else [(4608, 3584), (3584, 18944), (200, 512)])
def test_int4pack_gemv_matches_reference(shape, group, min_form, words):
    """The one-row kernel on the packed codes (all tile settings' edges: outputs not a multiple of the
    program's, k-tiles not of the step's) against the float32 reference of the same bfloat16 scales and
    zeros; x is exact in bfloat16, so what remains is the output's rounding (relative ~2e-3) and the order
    of accumulation. On CUDA also against torch's own int4 matmul of the same packing."""
    from qwen_serve.kernels import int4pack

    n, k = shape
    if k % (32 * words) or k % group:
        pytest.skip("the shape does not fill the layout's k-tiles or the groups")
    qweight, zeros, scales = random_packed(n, k, 4, group, seed=n, min_form=min_form)
    codes = ql.unpack_codes(qweight, 4)
    scales_zeros = int4pack.scales_and_zeros(zeros, scales, torch.bfloat16)
    packed = int4pack.layout_reference(codes, 2 * words)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(1, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    ref = x.float() @ int4pack.dequantize_reference(packed, scales_zeros, group).t() + bias.float()
    dev = [t.to(DEVICE) for t in (x, packed, scales_zeros, bias)]
    for tiles in [(8, 2, 1), (16, 8, 2), (4, 4, 1)] if INTERPRETED else [*int4pack.GEMV_TILES.values(), (16, 8, 4)]:
        out = int4pack.gemv(dev[0], dev[1], group, dev[2], dev[3], tiles)
        assert out.shape == (1, n) and out.dtype == torch.bfloat16
        assert rel_err(out, ref) < 5e-3, tiles
    assert rel_err(int4pack.gemv(dev[0], dev[1], group, dev[2], None), ref - bias.float()) < 5e-3
    if DEVICE == "cuda" and words == 4:
        tinygemm = torch.ops.aten._weight_int4pack_mm(dev[0], int4pack.torchs_order(dev[1]), group, dev[2]) + dev[3]
        assert rel_err(out, tinygemm) < 5e-3


@pytest.mark.parametrize("group,min_form", [(32, False), (128, False), (256, False), (32, True)])
@pytest.mark.parametrize("rows", [1, 5, 17, 130] if INTERPRETED else [1, 2, 17, 64, 200])
@pytest.mark.parametrize("shape", [(48, 256)] if INTERPRETED else [(4608, 3584), (3584, 18944), (200, 512)])
def test_int4pack_mm_matches_reference(shape, rows, group, min_form):
    """The tensor-core kernel on the packed codes, at tile settings whose edges the shapes cut (rows and
    outputs not a multiple of the block's, k-tiles not of the split's), against the float32 reference of the
    same bfloat16 scales and zeros: the output's rounding (relative ~2e-3), the order of accumulation and each
    weight's rounding to bfloat16, as the dequantize + cuBLAS path it replaces does (~2e-3 more)."""
    from qwen_serve.kernels import int4pack

    n, k = shape
    qweight, zeros, scales = random_packed(n, k, 4, group, seed=n, min_form=min_form)
    scales_zeros = int4pack.scales_and_zeros(zeros, scales, torch.bfloat16)
    packed = int4pack.layout_reference(ql.unpack_codes(qweight, 4), int4pack.INNER_K_TILES)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    ref = x.float() @ int4pack.dequantize_reference(packed, scales_zeros, group).t() + bias.float()
    dev = [t.to(DEVICE) for t in (x, packed, scales_zeros, bias)]
    configs = [(16, 16, 4, 1), (32, 16, 4, 3)] if INTERPRETED else [
        (16, 64, 4, 1), (64, 128, 8, 3), (256, 64, 4, 1), (256, 128, 8, 2)]
    for config in configs:
        out = int4pack.mm(dev[0], dev[1], group, dev[2], dev[3], config)
        assert out.shape == (rows, n) and out.dtype == torch.bfloat16
        assert rel_err(out, ref) < 8e-3, config
    if DEVICE == "cuda":  # as served
        assert rel_err(int4pack.linear(dev[0], dev[1], group, dev[2], None), ref - bias.float()) < 8e-3


@pytest.mark.skipif(INTERPRETED, reason="torch's int4 packing is a CUDA kernel, not Triton")
@pytest.mark.parametrize("tiles", [2, 4, 8])
def test_int4pack_layout_is_torchs(tiles, monkeypatch):
    """dequantize_reference undoes `pack` (the codes come back where they were), layout_reference makes it,
    and torchs_order gives back torch's own CUDA packing of the same codes."""
    from qwen_serve.kernels import int4pack

    monkeypatch.setattr(int4pack, "INNER_K_TILES", tiles)
    n, k, group = 4608, 3584, 128
    qweight, zeros, scales = random_packed(n, k, 4, group, seed=tiles)
    codes = ql.unpack_codes(qweight, 4)
    packed, scales_zeros = int4pack.pack(codes.to(DEVICE), zeros.to(DEVICE), scales.to(DEVICE), torch.bfloat16)
    unit = torch.stack([torch.ones(k // group, n), torch.full((k // group, n), 8.0)], dim=-1)
    assert torch.equal(int4pack.dequantize_reference(packed.cpu(), unit, group), codes.float())
    assert torch.equal(int4pack.layout_reference(codes, tiles), packed.cpu())
    pairs = (codes[:, ::2].to(torch.int32) << 4 | codes[:, 1::2].to(torch.int32)).to(torch.uint8)
    torchs = torch.ops.aten._convert_weight_to_int4pack(pairs.to(DEVICE), tiles)
    assert torch.equal(int4pack.torchs_order(packed), torchs)
    s, z = (t.float().cpu().t().repeat_interleave(group, dim=1) for t in scales_zeros.unbind(-1))
    weight = int4pack.dequantize(packed, scales_zeros, group)
    torch.testing.assert_close(weight.cpu(), ((codes.float() - 8) * s + z).bfloat16())  # one bfloat16 rounding
