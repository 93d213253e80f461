"""GGUF files (llama.cpp's format) converted into Hugging Face style checkpoint directories.

`gguf_checkpoint_dir(file)` returns a directory that `load_model` (config.json + *.safetensors)
and `load_tokenizer` (AutoTokenizer, local files) read like any HF checkpoint; the work is done
once per file and cached. `convert_gguf(file, out_dir)` does one conversion; `gguf_config(file)`
maps the metadata to a HF `config.json` dict. Nothing is downloaded.

Conversion (`gguf` package: `GGUFReader` memory-maps the file, `gguf.quants.dequantize`):
- config.json from the metadata: `general.architecture` `llama` (Llama 2/3, Mistral: llama.cpp
  writes Mistral as `llama`), `qwen2` or `qwen3` (dense); `<arch>.block_count`,
  `embedding_length`, `feed_forward_length`, `attention.head_count(_kv)`, `attention.key_length`
  (head_dim, else hidden / heads), `rope.freq_base`, `attention.layer_norm_rms_epsilon`,
  `context_length`, rope scaling (`rope.scaling.type` linear, or Llama 3.1's `rope_freqs.weight`
  tensor matched back to `llama3` parameters), vocab size (the embedding's rows), bos/eos ids
  (`tokenizer.ggml.*`; eos also takes `eot_token_id`), `tie_word_embeddings` when there is no
  `output.weight`, biases from the tensors present (`qwen3`: attention biases on q, k, v and o,
  as Llama's; no MLP biases). Float metadata is stored as the shortest decimal of its float32
  value (1e-05, not 9.99999974e-06).
- weights: GGUF names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output`) to HF names,
  dequantized to float32, shaped `[out, in]` (GGUF lists dims innermost first: the reverse), cast
  to the target dtype (float32 by default, so the stored values are exactly the dequantized
  ones), written as safetensors shards of at most `max_shard_bytes` (an index when several).
  For `llama`, llama.cpp's converter permuted the rows of Q and K (weights and biases) of each
  head from HF's rotate-half order to interleaved pairs; that is undone here (`unpermute_qk`,
  as transformers' own GGUF loader does). `qwen2`/`qwen3` GGUFs keep HF's order. `qwen3`'s
  per-head q/k norms `blk.N.attn_q_norm`/`attn_k_norm` (`[head_dim]`) become
  `self_attn.q_norm`/`k_norm`.
- tokenizer: when the file has `tokenizer.ggml.model`, `AutoTokenizer.from_pretrained(dir,
  gguf_file=name)` builds it and `save_pretrained` writes it, chat template included
  (`tokenizer.chat_template`); without tokenizer metadata no tokenizer files are written.
- `gguf_source.json` records the converter's format version, the source path, size and sha256,
  the quantization types, the stored dtype.

Cache: `<root>/gguf/<first 16 hex of the file's sha256>/`, root = `$VATTENTION_CACHE_DIR`, else
`$XDG_CACHE_HOME/vattention`, else `~/.cache/vattention`. The file is hashed on each start (about
0.2 s for 100 MB; memoised in-process by path, size and mtime). Invariants:
- a cache directory appears only complete: the conversion writes into a temporary sibling
  `.<key>.tmp-<pid>-<random>` (files fsynced) renamed into place at the end, so a crash leaves at
  most a temporary directory (removed on failure, or by a later conversion once 6 h old);
- a directory is reused only when its `gguf_source.json` has this format version and the file's
  full sha256; otherwise it is converted again and replaced;
- two processes converting at once each write their own temporary directory; the first rename
  wins and the other process uses the winner's directory.
Errors are ValueErrors that name the problem: not a GGUF file, unsupported architecture,
unsupported quantization type (with the supported ones), missing, unexpected or mis-shaped
tensors, missing metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SOURCE_FILE = "gguf_source.json"
GGUF_MAGIC = b"GGUF"
# GGUF `general.architecture` -> (HF architecture, model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
# llama.cpp permutes Q/K rows for these architectures (its Llama RoPE layout); qwen2/3 are NeoX.
_PERMUTED_QK = ("llama",)
# what `gguf.quants.dequantize` turns into float32 and we accept
SUPPORTED_QUANT_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3 only (check_tensors rejects them elsewhere)
    "attn_k_norm": "self_attn.k_norm",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 rope factors: folded into config.rope_scaling
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_STALE_TEMP_S = 6 * 3600
_SHA_MEMO: dict[tuple[str, int, int], str] = {}


# ---- files and cache ---------------------------------------------------------------------------
def cache_root() -> Path:
    """`$VATTENTION_CACHE_DIR`, else `$XDG_CACHE_HOME/vattention`, else `~/.cache/vattention`."""
    if os.environ.get("VATTENTION_CACHE_DIR"):
        return Path(os.environ["VATTENTION_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "vattention"
    return Path.home() / ".cache" / "vattention"


def is_gguf_file(path: str | Path) -> bool:
    """True when `path` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the file (memoised in this process by path, size and mtime)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    if not is_gguf_file(path):
        raise ValueError(f"{str(path)!r} is not a GGUF file (it does not start with b'GGUF')")


def _read_source(directory: Path) -> dict[str, Any] | None:
    try:
        with open(directory / SOURCE_FILE) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _is_current(directory: Path, sha256: str) -> bool:
    src = _read_source(directory)
    return (
        src is not None
        and src.get("format") == FORMAT_VERSION
        and src.get("sha256") == sha256
        and (directory / "config.json").is_file()
    )


def gguf_checkpoint_dir(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cached HF-style directory of GGUF file `path`, converting it first if needed."""
    path = Path(path).expanduser()
    _check_file(path)
    sha = file_sha256(path)
    parent = (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / "gguf"
    key = sha[:16]
    final = parent / key
    if _is_current(final, sha):
        return final
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(parent, key)
    tmp = parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    logger.info("converting GGUF %s into %s (once)", path, final)
    try:
        convert_gguf(path, tmp, sha256=sha)
        _publish(tmp, final, sha)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", path.name, time.perf_counter() - start)
    return final


def _publish(tmp: Path, final: Path, sha: str) -> None:
    """Rename the finished `tmp` to `final` (atomic); replace an outdated `final`."""
    try:
        os.rename(tmp, final)
    except OSError:
        if _is_current(final, sha):  # another process finished first: use its directory
            return
        old = final.parent / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)  # an outdated or foreign directory: move it aside, then replace
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


def _remove_stale(parent: Path, key: str) -> None:
    """Temporary directories of `key` left by crashed conversions (older than 6 h)."""
    now = time.time()
    for p in parent.glob(f".{key}.*"):
        try:
            if now - p.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- metadata ----------------------------------------------------------------------------------
def open_gguf(path: str | Path) -> Any:
    """A `gguf.GGUFReader` over `path` (clear errors for missing files and non-GGUF files)."""
    path = Path(path).expanduser()
    _check_file(path)
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError(
            f"reading GGUF files needs the 'gguf' package: pip install gguf ({e})"
        ) from e
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ValueError(f"{str(path)!r} is not a readable GGUF file: {e}") from e


def _value(field: Any) -> Any:
    from gguf import GGUFValueType

    def one(part: np.ndarray, kind: Any) -> Any:
        if kind == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        return part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [one(field.parts[i], field.types[-1]) for i in field.data]
    return one(field.parts[field.data[0]], field.types[0])


def _meta(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else _value(field)


def _float(value: Any) -> float:
    """The shortest decimal that rounds to the same float32 (1e-05 rather than 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _source_name(reader: Any) -> str:
    return str(
        getattr(reader, "path", None) or getattr(getattr(reader, "data", None), "filename", "")
    )


def _tensors(reader: Any) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def _hf_shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(list(tensor.shape)))


def gguf_config(path_or_reader: str | Path | Any, dtype: str = "float32") -> dict[str, Any]:
    """The HF `config.json` dict for a GGUF file (see the module docstring for the mapping)."""
    reader = open_gguf(path_or_reader) if isinstance(path_or_reader, str | Path) else path_or_reader
    where = _source_name(reader)
    arch = _meta(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {where!r}; supported: "
            f"{sorted(ARCHITECTURES)} (Mistral GGUFs are 'llama')"
        )
    hf_arch, model_type = ARCHITECTURES[arch]

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = _meta(reader, f"{arch}.{key}", default)
        if value is None and required:
            raise ValueError(f"GGUF file {where!r} lacks the metadata key {arch}.{key!r}")
        if isinstance(value, list):  # per-layer values (some converters): must all agree
            if len(set(value)) != 1:
                raise ValueError(f"{arch}.{key} differs between layers ({value}): unsupported")
            value = value[0]
        return value

    tensors = _tensors(reader)
    if "token_embd.weight" not in tensors:
        raise ValueError(f"GGUF file {where!r} lacks the tensor 'token_embd.weight'")
    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    value_dim = int(get("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"key_length {head_dim} != value_length {value_dim}: unsupported")
    rope_dim = get("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ValueError(
            f"partial rotary embeddings (rope.dimension_count {rope_dim} of head_dim {head_dim}) "
            "are not supported"
        )
    rope_theta = _float(get("rope.freq_base", 10000.0))
    vocab = _hf_shape(tensors["token_embd.weight"])[0]
    layer0 = {n for n in tensors if n.startswith("blk.0.")}
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", required=True)),
        "rms_norm_eps": _float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(reader, arch, tensors, head_dim, rope_theta),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": dtype,
    }
    if model_type in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
    if model_type != "qwen2":
        config["attention_bias"] = "blk.0.attn_q.bias" in layer0
    if model_type == "llama":  # HF's Qwen3 MLP has no biases
        config["mlp_bias"] = "blk.0.ffn_up.bias" in layer0
    bos = _meta(reader, "tokenizer.ggml.bos_token_id")
    eos = [
        int(v)
        for k in ("eos_token_id", "eot_token_id")
        if (v := _meta(reader, f"tokenizer.ggml.{k}")) is not None
    ]
    config["bos_token_id"] = None if bos is None else int(bos)
    eos = list(dict.fromkeys(eos))
    config["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    return config


def _rope_scaling(
    reader: Any, arch: str, tensors: dict[str, Any], head_dim: int, theta: float
) -> dict[str, Any] | None:
    kind = _meta(reader, f"{arch}.rope.scaling.type")
    factor = _meta(reader, f"{arch}.rope.scaling.factor")
    if kind is None and _meta(reader, f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", _meta(reader, f"{arch}.rope.scale_linear")
    scaling: dict[str, Any] | None = None
    if kind == "linear" and factor is not None and float(factor) != 1.0:
        scaling = {"rope_type": "linear", "factor": _float(factor)}
    elif kind not in (None, "none", "linear"):
        raise ValueError(
            f"unsupported GGUF rope scaling {kind!r}; supported: none, linear, llama3 "
            "(rope_freqs.weight)"
        )
    if _ROPE_FREQS in tensors:
        if scaling is not None:
            raise ValueError("GGUF has both rope.scaling.type linear and rope_freqs: unsupported")
        original = _meta(reader, f"{arch}.rope.scaling.original_context_length")
        scaling = _llama3_from_factors(_dequantize(tensors[_ROPE_FREQS]), head_dim, theta, original)
    return scaling


def _llama3_from_factors(
    factors: np.ndarray, head_dim: int, theta: float, original: int | None
) -> dict[str, Any] | None:
    """Llama 3.1 rope parameters whose per-frequency factors are `factors` (llama.cpp divides
    each frequency by its factor); a clear error when no usual parameter set matches."""
    from vattention.models.config import RopeScaling
    from vattention.models.rope import inverse_frequencies

    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape[0] != head_dim // 2:
        raise ValueError(f"rope_freqs has {factors.shape[0]} entries, expected {head_dim // 2}")
    if np.allclose(factors, 1.0):
        return None
    want = inverse_frequencies(head_dim, theta).double().numpy() / factors
    factor = _float(factors.max())
    olds = [int(original)] if original else []
    olds += [n for n in (8192, 4096, 2048, 16384, 32768) if n not in olds]
    for old in olds:
        for low in (1.0, 2.0):
            for high in (4.0, 8.0):
                cand = RopeScaling("llama3", factor, low, high, old)
                got = inverse_frequencies(head_dim, theta, cand).double().numpy()
                if np.allclose(got, want, rtol=1e-4, atol=0):
                    return {
                        "rope_type": "llama3",
                        "factor": factor,
                        "low_freq_factor": low,
                        "high_freq_factor": high,
                        "original_max_position_embeddings": old,
                    }
    raise ValueError(
        "the GGUF's rope_freqs.weight matches no llama3 rope scaling (factor "
        f"{factor}, low_freq_factor 1/2, high_freq_factor 4/8, original context {olds}): unsupported"
    )


# ---- weights -----------------------------------------------------------------------------------
def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (`permute` in its convert_hf_to_gguf.py).

    llama.cpp reshapes the `[n_head * head_dim, ...]` rows to `(n_head, 2, head_dim // 2)` and
    swaps the last two axes (rotate-half halves -> interleaved pairs); this is the inverse."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor: Any) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        out = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(
            f"cannot dequantize tensor {tensor.name!r} of type {tensor.tensor_type.name}: {e}; "
            f"supported: {list(SUPPORTED_QUANT_TYPES)}"
        ) from e
    out = np.asarray(out, dtype=np.float32).reshape(_hf_shape(tensor))
    return out if out.flags.writeable else out.copy()  # F32 tensors are views of the mmap


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF checkpoint name of GGUF tensor `gguf_name` (None: not a known weight)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_NAME.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_TENSORS:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> HF shape `[out, in]` for every tensor the model needs."""
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    qwen2 = config["model_type"] == "qwen2"
    head_dim = config["head_dim"]
    attn_bias, mlp_bias = config.get("attention_bias", False), config.get("mlp_bias", False)
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (v, h), "output_norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["output.weight"] = (v, h)
    layer = {
        "attn_norm.weight": (h,),
        "ffn_norm.weight": (h,),
        "attn_q.weight": (q, h),
        "attn_k.weight": (kv, h),
        "attn_v.weight": (kv, h),
        "attn_output.weight": (h, q),
        "ffn_gate.weight": (inter, h),
        "ffn_up.weight": (inter, h),
        "ffn_down.weight": (h, inter),
    }
    if config["model_type"] == "qwen3":
        layer.update({"attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)})
    if qwen2 or attn_bias:
        layer.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)})
    if attn_bias and not qwen2:
        layer["attn_output.bias"] = (h,)
    if mlp_bias:
        layer.update({"ffn_gate.bias": (inter,), "ffn_up.bias": (inter,), "ffn_down.bias": (h,)})
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{k}": s for k, s in layer.items()})
    return shapes


def check_tensors(reader: Any, config: dict[str, Any]) -> None:
    """Every tensor the model needs is present with its shape and a type we can dequantize;
    nothing else is there (ValueError naming the offending tensors)."""
    where = _source_name(reader)
    tensors = _tensors(reader)
    bad_types = Counter(
        t.tensor_type.name
        for t in tensors.values()
        if t.tensor_type.name not in SUPPORTED_QUANT_TYPES
    )
    if bad_types:
        names = [n for n, t in tensors.items() if t.tensor_type.name in bad_types][:4]
        raise ValueError(
            f"GGUF file {where!r} has tensors of unsupported quantization type(s) "
            f"{sorted(bad_types)} (e.g. {names}); supported: {list(SUPPORTED_QUANT_TYPES)}"
        )
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        shown = missing[:8] + (["..."] if len(missing) > 8 else [])
        raise ValueError(f"GGUF file {where!r} lacks {len(missing)} tensor(s): {shown}")
    unexpected = sorted(set(tensors) - set(expected) - {_ROPE_FREQS})
    if unexpected:
        shown = unexpected[:8] + (["..."] if len(unexpected) > 8 else [])
        raise ValueError(
            f"GGUF file {where!r} has tensor(s) this {config['model_type']} model does not use: "
            f"{shown}"
        )
    for name, want in expected.items():
        got = _hf_shape(tensors[name])
        if got != want:
            raise ValueError(
                f"tensor {name!r} in {where!r} has shape {got} ([out, in]), expected {want}"
            )


def iter_hf_tensors(
    reader: Any, config: dict[str, Any], dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight, dequantized, Q/K un-permuted, cast to `dtype`."""
    permuted = config["model_type"] in _PERMUTED_QK
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            continue  # rope_freqs (folded into the config); check_tensors rejected the rest
        w = _dequantize(t)
        if permuted and ".attn_q." in t.name:
            w = unpermute_qk(w, heads)
        elif permuted and ".attn_k." in t.name:
            w = unpermute_qk(w, kv_heads)
        yield name, torch.from_numpy(np.ascontiguousarray(w)).to(dtype)


def _write_safetensors(
    tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int
) -> list[Path]:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files: list[Path] = []

    def flush() -> None:
        nonlocal size
        file = out_dir / f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], str(file), metadata={"format": "pt"})
        files.append(file)
        shards[-1] = {}
        size = 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = t
        size += nbytes
    if shards[-1] or not files:
        flush()
    if len(files) == 1:
        single = out_dir / "model.safetensors"
        files[0].rename(single)
        return [single]
    from safetensors import safe_open

    weight_map = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), file.name))  # noqa: SIM118
    with open(out_dir / "model.safetensors.index.json", "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh, indent=1)
    return files


def _save_tokenizer(path: Path, reader: Any, out_dir: Path) -> bool:
    """Build the tokenizer from the GGUF with transformers and save it; False without one."""
    if "tokenizer.ggml.model" not in reader.fields:
        return False
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except Exception as e:  # transformers raises many kinds for unsupported tokenizers
        raise ValueError(f"cannot build the tokenizer of GGUF file {str(path)!r}: {e}") from e
    template = _meta(reader, "tokenizer.chat_template")
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    tok.save_pretrained(str(out_dir))
    return True


def convert_gguf(
    path: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | str = torch.float32,
    sha256: str | None = None,
    max_shard_bytes: int = 4 << 30,
) -> Path:
    """Convert GGUF file `path` into a new HF-style directory `out_dir` (must not exist or be
    empty): config.json, generation_config.json, safetensors, tokenizer files, gguf_source.json."""
    from vattention.kvcache.spec import parse_dtype

    path = Path(path).expanduser()
    out_dir = Path(out_dir)
    torch_dtype = parse_dtype(dtype)
    dtype_name = str(torch_dtype).replace("torch.", "")
    reader = open_gguf(path)
    config = gguf_config(reader, dtype_name)
    check_tensors(reader, config)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output directory {str(out_dir)!r} is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = _write_safetensors(
        iter_hf_tensors(reader, config, torch_dtype), out_dir, max_shard_bytes
    )
    with open(out_dir / "config.json", "w") as fh:
        json.dump(config, fh, indent=2)
    generation = {
        k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None
    }
    with open(out_dir / "generation_config.json", "w") as fh:
        json.dump(generation, fh, indent=2)
    has_tokenizer = _save_tokenizer(path, reader, out_dir)
    quant = Counter(t.tensor_type.name for t in reader.tensors)
    source = {
        "format": FORMAT_VERSION,
        "source": str(path.resolve()),
        "size": path.stat().st_size,
        "sha256": sha256 or file_sha256(path),
        "name": _meta(reader, "general.name"),
        "architecture": _meta(reader, "general.architecture"),
        "quantization_types": dict(sorted(quant.items())),
        "dtype": dtype_name,
        "tokenizer": has_tokenizer,
        "weights": [f.name for f in files],
    }
    with open(out_dir / SOURCE_FILE, "w") as fh:
        json.dump(source, fh, indent=2)
    for file in out_dir.iterdir():
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    return out_dir
