"""`POST /v1/embeddings` through the OpenAI client: equal to `LLM.embed` on the same model, in
input order, with `dimensions` and base64; bad inputs are 4xx errors that leave nothing behind."""

from __future__ import annotations

import base64
import struct

import openai
import pytest
import torch

from tests.server.conftest import MAX_MODEL_LEN, MODEL
from vattention import PoolingParams


def test_embeddings_equal_llm_embed(client: openai.OpenAI, llm: object) -> None:
    texts = ["virtual memory", "a page table maps pages", "x"]
    got = client.embeddings.create(model=MODEL, input=texts)
    want = llm.embed(texts, use_tqdm=False)  # type: ignore[attr-defined]
    assert [d.index for d in got.data] == [0, 1, 2]
    for d, w in zip(got.data, want, strict=True):
        torch.testing.assert_close(torch.tensor(d.embedding), torch.tensor(w.outputs.embedding),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    assert got.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)
    ids = want[1].prompt_token_ids
    one = client.embeddings.create(model=MODEL, input=[ids], dimensions=8)
    cut = llm.embed([ids], PoolingParams(dimensions=8), use_tqdm=False)  # type: ignore[attr-defined]
    assert len(one.data[0].embedding) == 8
    torch.testing.assert_close(torch.tensor(one.data[0].embedding),
                               torch.tensor(cut[0].outputs.embedding), atol=1e-5, rtol=1e-5)  # fmt: skip


def test_base64_is_little_endian_float32(client: openai.OpenAI) -> None:
    raw = client.embeddings.with_raw_response.create(
        model=MODEL, input="hello", encoding_format="base64"
    ).http_response.json()
    blob = base64.b64decode(raw["data"][0]["embedding"])
    floats = struct.unpack(f"<{len(blob) // 4}f", blob)
    plain = client.embeddings.create(model=MODEL, input="hello", encoding_format="float")
    assert floats == pytest.approx(plain.data[0].embedding, abs=1e-6)


def test_bad_embedding_requests(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=MODEL, input="x", dimensions=100_000)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.embeddings.create(model=MODEL, input=[[5] * MAX_MODEL_LEN])
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.embeddings.create(model=MODEL, input=[[10**6]])
