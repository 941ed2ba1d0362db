"""The GGUF CPU kernels (kernels/cpu_gguf.cpp) against their torch reference and the gguf package's own
dequantization."""

from __future__ import annotations

import pytest
import torch

from qwen_serve.kernels import cpu_extension, cpu_gguf
from qwen_serve.layers.quantization.gguf import dequantize, random_blocks

pytestmark = pytest.mark.skipif(not cpu_extension.available(), reason="the GGUF CPU kernels cannot be built here")

FORMATS = list(cpu_gguf.TYPE_IDS)


def _in_features(type_name: str) -> int:
    return 512 if type_name.endswith("_K") else 96  # whole blocks: 2 of 256, or 3 of 32


def _layer(type_name: str, seed: int) -> list[tuple[str, torch.Tensor]]:
    """Three shards, as a merged q|k|v: the format under test, Q8_0 and Q5_0 (every kernel's output lands at
    an offset among the layer's outputs; none is a whole number of the many-row path's tiles of 16)."""
    gen = torch.Generator().manual_seed(seed)
    k = _in_features(type_name)
    return [(type_name, random_blocks(type_name, 37, k, gen)), ("Q8_0", random_blocks("Q8_0", 8, k, gen)),
            ("Q5_0", random_blocks("Q5_0", 19, k, gen))]


@pytest.fixture(scope="module", params=["native", "haswell"])
def kernels(request):
    """The kernels as served (this CPU's instructions), and built for AVX2 alone: the paths of CPUs without
    AVX-512 or VNNI (maddubs, byte shuffles) run here too."""
    module = cpu_extension.build(request.param)
    if module is None:
        pytest.skip(f"the kernels cannot be built for {request.param} here")
    return module


def _weight(shards: list[tuple[str, torch.Tensor]], k: int) -> torch.Tensor:
    """The layer's weight in float64, from the torch decoder (tests/test_gguf.py checks it against the gguf
    package's own dequantization)."""
    return torch.cat([dequantize(blocks, t, (blocks.shape[0], k)) for t, blocks in shards]).double()


# 1-2 rows: the row kernels (4 activation rows at a time); from 3, the tiles (8 rows at a time on AVX-512, 2 on
# AVX2): 9 and 17 leave a remainder there.
@pytest.mark.parametrize("rows", [1, 2, 3, 6, 9, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("type_name", FORMATS)
def test_linear_matches_its_reference(kernels, type_name, dtype, rows):
    """The same rounded activations times the same weights: only the order of float32 sums differs (the
    bound: 1e-5 of sum |w x|), plus the output's own rounding in bfloat16."""
    shards = _layer(type_name, seed=rows)
    k = _in_features(type_name)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    bias = torch.randn(64, generator=gen).to(dtype)
    ours = kernels.linear(x, [b for _, b in shards], [cpu_gguf.TYPE_IDS[t] for t, _ in shards], bias)
    ref = cpu_gguf.linear_reference(x.double(), shards, bias.double())
    assert ours.dtype == dtype and ours.shape == (rows, 64)
    scale = x.double().abs() @ _weight(shards, k).abs().T
    rounding = ref.abs() * (2**-8 if dtype == torch.bfloat16 else 0)
    assert ((ours.double() - ref).abs() <= 1e-5 * scale + rounding + 1e-12).all()


@pytest.mark.parametrize("type_name", FORMATS)
def test_rounding_the_activations_stays_within_half_a_step(type_name):
    """Against the exact product: each input moves by at most half its block's step d = max|x| / 127, so each
    output by at most sum(|w| d / 2)."""
    shards = _layer(type_name, seed=3)
    k = _in_features(type_name)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(11)).double()  # float32 values: rounded from them
    weight = _weight(shards, k)
    _, d = cpu_gguf.quantize_reference(x)
    bound = (d.double().repeat_interleave(cpu_gguf.ACTIVATION_BLOCK, 1) / 2) @ weight.abs().T
    err = (cpu_gguf.linear_reference(x, shards, None) - x @ weight.T).abs()
    assert (err <= bound * (1 + 1e-9)).all()
    assert err.max() > 0  # the rounding is there: the bound is not met trivially


@pytest.mark.parametrize("rows", [2, 5])  # both paths
def test_zero_activations_give_the_bias(rows):
    shards = _layer("Q5_0", seed=0)
    bias = torch.arange(64, dtype=torch.float32)
    assert torch.equal(cpu_gguf.linear(torch.zeros(rows, 96), shards, bias), bias.expand(rows, 64))


def test_blocks_of_the_wrong_width_are_refused():
    gen = torch.Generator().manual_seed(0)
    blocks = random_blocks("Q5_0", 4, 96, gen)
    with pytest.raises(RuntimeError, match="do not hold 128 values"):
        cpu_gguf.linear(torch.randn(1, 128), [("Q5_0", blocks)], None)
    with pytest.raises(RuntimeError, match="do not hold 96 values"):
        cpu_gguf.linear(torch.randn(1, 96), [("Q5_0", blocks[:, :-1].contiguous())], None)


def test_a_lock_left_by_an_interrupted_build_is_removed(tmp_path):
    """torch waits on its build lock without a timeout: one older than any build is cleared, a fresh one (a
    build under way in another process) is left alone."""
    lock = tmp_path / "lock"
    lock.touch()
    now = lock.stat().st_mtime
    assert not cpu_extension.remove_stale_lock(tmp_path, now=now + 60) and lock.exists()
    assert cpu_extension.remove_stale_lock(tmp_path, now=now + cpu_extension.STALE_LOCK_S + 1) and not lock.exists()
    assert not cpu_extension.remove_stale_lock(tmp_path)  # none there
