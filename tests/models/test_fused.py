"""The fused Triton kernels equal the torch reference path (CPU: under the Triton interpreter)."""

from __future__ import annotations

import pytest
import torch

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
