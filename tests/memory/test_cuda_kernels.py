"""GPU only: kernels write through the mapped virtual ranges and the data reads back."""

from __future__ import annotations

import pytest
import torch

from tests.kvcache.helpers import make_spec
from vattention import VirtualKVCache

pytestmark = pytest.mark.gpu


def test_triton_kernel_writes_through_cache_views() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def write_rows(ptr, stride_tok, n_tok, row: tl.constexpr, value):
        pid = tl.program_id(0)
        offs = tl.arange(0, row)
        tl.store(ptr + pid * stride_tok + offs, (value + pid).to(ptr.dtype.element_ty))

    spec = make_spec("cuda", "cross_layer")
    with VirtualKVCache(spec, "cuda", budget_bytes=1 << 34) as cache:
        s = cache.alloc_slot()
        cache.ensure(s, spec.max_seq_len)
        k = cache.k_cache(2)[s]  # [max_len, heads, dim], a strided view into VMM memory
        row = spec.num_kv_heads * spec.head_dim
        write_rows[(spec.max_seq_len,)](k, k.stride(0), spec.max_seq_len, row, 1.0)
        torch.cuda.synchronize()
        got = k.float().cpu().reshape(spec.max_seq_len, -1)
        want = (1.0 + torch.arange(spec.max_seq_len, dtype=torch.float32)).to(spec.dtype).float()
        assert torch.equal(got, want[:, None].expand_as(got))


def test_torch_kernels_read_vmm_memory_like_plain_memory() -> None:
    spec = make_spec("cuda", "per_layer")
    with VirtualKVCache(spec, "cuda", budget_bytes=1 << 34) as cache:
        slots = [cache.alloc_slot() for _ in range(spec.max_slots)]
        cache.step({s: spec.max_seq_len for s in slots})
        for layer in range(spec.num_layers):
            src = torch.randn(
                spec.max_slots,
                spec.max_seq_len,
                spec.num_kv_heads,
                spec.head_dim,
                device="cuda",
                dtype=spec.dtype,
            )
            cache.k_cache(layer).copy_(src)
            assert torch.equal(cache.k_cache(layer).clone(), src)
            assert torch.allclose(cache.k_cache(layer).float().sum(), src.float().sum())
