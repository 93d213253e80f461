"""The fused Triton kernels equal the torch reference path (CPU: under the Triton interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vattention.models.fused import rope_qkv, silu_and_mul
from vattention.models.layers import silu_and_mul as torch_silu_and_mul
from vattention.models.rope import RotaryEmbedding, apply_rotary

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("hq", "hkv", "d"), [(4, 2, 16), (8, 8, 32), (6, 1, 64)])
def test_rope_qkv_matches_torch(hq: int, hkv: int, d: int) -> None:
    t = 7
    rope = RotaryEmbedding(d, 64, 10000.0)
    rope.cos_sin = rope.cos_sin.to(DEV)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEV)
    pos = torch.tensor([0, 5, 1, 63, 2, 2, 40], device=DEV)
    q, k, v = rope_qkv(qkv, rope.cos_sin, pos, hq, hkv, d)
    cos, sin = rope.lookup(pos, torch.float32)
    rq, rk, rv = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    torch.testing.assert_close(q, apply_rotary(rq.view(t, hq, d), cos, sin), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, apply_rotary(rk.view(t, hkv, d), cos, sin), atol=1e-5, rtol=1e-5)
    assert torch.equal(v, rv.view(t, hkv, d))


def test_silu_and_mul_matches_torch() -> None:
    x = torch.randn(5, 2 * 1500, device=DEV)  # not a multiple of the block: masked tail
    torch.testing.assert_close(silu_and_mul(x), torch_silu_and_mul(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 1000])  # 1000: not a power of two (masked tail)
def test_add_rms_norm_matches_the_torch_path(dtype: torch.dtype, n: int) -> None:
    from vattention.models.fused import add_rms_norm
    from vattention.models.layers import RMSNorm

    gen = torch.Generator().manual_seed(n)
    x, r = (torch.randn(6, n, generator=gen).to(DEV, dtype) for _ in range(2))
    norm = RMSNorm(n, eps=1e-6).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(n, generator=gen) + 0.5)
    out, summed = add_rms_norm(x, r, norm.weight.to(dtype), norm.eps)
    if DEV == "cuda" or dtype == torch.float32:
        assert torch.equal(summed, x + r)  # the add rounds exactly as torch's does
    else:  # the Triton interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest)
        torch.testing.assert_close(summed, x + r, atol=0, rtol=2**-7)
    want = F.rms_norm(summed.float(), (n,), norm.weight.float(), norm.eps)  # one rounding
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)
    ref_out, ref_sum = norm.add_forward(x, r)  # the unfused path gives the same pair
    assert torch.equal(ref_sum, x + r)
    loose = tol if DEV == "cuda" else 3 * tol  # the interpreter's sum may be one ulp off
    torch.testing.assert_close(ref_out.float(), out.float(), atol=loose, rtol=loose)


def test_add_rms_norm_rejects_mismatched_shapes() -> None:
    from vattention.models.fused import add_rms_norm

    x = torch.randn(3, 8, device=DEV)
    with pytest.raises(ValueError, match="do not match"):
        add_rms_norm(x, torch.randn(3, 4, device=DEV), torch.ones(8, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="do not match"):
        add_rms_norm(x, x, torch.ones(4, device=DEV), 1e-6)
