"""GPU: the llama-3-8b preset (random weights, bf16) through our engine path matches HF logits.

Prefill two prompts of different lengths, then decode three greedy tokens through the real
`VirtualKVCache` on CUDA and the default (`auto`) attention backend. "Within bf16 tolerance" is
measured, not guessed: at every step our bf16 logits must be as close to HF's float32 logits as
HF's own bf16 logits are (within 1.5x, or 2% relative), and must pick the same greedy token.
"""

from __future__ import annotations

import pytest
import torch

from vattention.attention import AttentionMetadata, create_backend
from vattention.kvcache.virtual import VirtualKVCache
from vattention.models.loader import load_hf_state_dict, load_model
from vattention.models.presets import get_preset

pytestmark = pytest.mark.gpu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.inference_mode()
def test_llama3_8b_preset_matches_hf_in_bf16() -> None:
    import transformers

    c = get_preset("llama-3-8b")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf32 = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = load_model("llama-3-8b", torch.bfloat16, "cuda", load_format="dummy")
    load_hf_state_dict(ours, hf32.state_dict())
    with torch.device("cuda"):
        hf16 = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    hf16.load_state_dict(hf32.state_dict())
    spec = c.kv_cache_spec(max_slots=4, max_seq_len=256, dtype=torch.bfloat16)
    with VirtualKVCache(spec, "cuda", budget_bytes=4 << 30) as cache:
        attn = create_backend("auto", cache, c.num_heads, c.num_kv_heads, c.head_dim)
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, c.vocab_size, (n,), generator=gen).tolist() for n in (17, 45)]
        slots = [cache.alloc_slot() for _ in prompts]
        seqs = [list(p) for p in prompts]
        for step in range(4):
            new = [s if step == 0 else s[-1:] for s in seqs]
            ctx = [0 if step == 0 else len(s) - 1 for s in seqs]
            for slot, n0, n in zip(slots, ctx, new, strict=True):
                cache.ensure(slot, n0 + len(n))
            meta = AttentionMetadata.build(slots, ctx, [len(n) for n in new], "cuda")
            ids = torch.tensor([t for n in new for t in n], device="cuda")
            hidden = ours(ids, meta.token_positions, meta, attn)
            logits = ours.compute_logits(hidden[(meta.query_start_loc[1:] - 1).long()])
            for i, seq in enumerate(seqs):
                x = torch.tensor([seq], device="cuda")
                ref = hf32(x).logits[0, -1].float()
                half = hf16(x).logits[0, -1].float()
                hf_err, err = _rel(half, ref), _rel(logits[i], ref)
                assert torch.isfinite(logits[i]).all()
                assert err <= max(1.5 * hf_err, 2e-2), (step, i, err, hf_err)
                top2 = ref.topk(2).values
                if float(top2[0] - top2[1]) > 0.25:  # a clear winner: bf16 noise cannot flip it
                    assert int(logits[i].argmax()) == int(ref.argmax()), (step, i)
                seq.append(int(ref.argmax()))
