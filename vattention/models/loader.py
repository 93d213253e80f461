"""`load_model`: build a Llama-family model from a local HF directory or a preset.

The model is built on the meta device (no memory, no init), moved to the target device with
`to_empty`, then filled: from safetensors one tensor at a time (`safe_open`, so no state-dict copy
is ever held) or with random weights (`load_format="dummy"`). Nothing is ever downloaded.
Invariants after a load: every parameter was written exactly once by a checkpoint tensor of the
right shape (else a ValueError names the missing/unexpected/mis-shaped tensors), the RoPE cache
is computed on the device, and the model is in eval mode.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from vattention.kvcache.spec import parse_dtype
from vattention.models.builtin import builtin_names, is_builtin
from vattention.models.config import ModelConfig
from vattention.models.layers import FusedLinear
from vattention.models.llama import LlamaForCausalLM
from vattention.models.presets import PRESETS, get_preset, preset_names

LOAD_FORMATS = ("auto", "safetensors", "dummy")
INDEX_FILE = "model.safetensors.index.json"
# checkpoint sub-name -> (our fused module, part index)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_LAYER_NAME = re.compile(r"^(model\.layers\.\d+)\.(self_attn\.[qkv]_proj|mlp\.(?:gate|up)_proj)\.")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def resolve_config(path_or_preset: str | Path) -> tuple[ModelConfig, Path | None]:
    """(config, model directory or None for a preset); clear error when it is neither."""
    path = Path(path_or_preset)
    if path.is_dir():
        return ModelConfig.from_pretrained(path), path
    if str(path_or_preset).lower() in PRESETS:
        return get_preset(str(path_or_preset)), None
    if is_builtin(str(path_or_preset)) or path.suffix.lower() == ".gguf":
        raise ValueError(
            f"{str(path_or_preset)!r} is a built-in model or a GGUF file: turn it into a directory "
            "with vattention.models.resolve_model first (LLM(...) does)"
        )
    raise ValueError(
        f"{str(path_or_preset)!r} is neither a local model directory nor a preset "
        f"(presets: {preset_names()}), a GGUF file or a built-in model (built-in: "
        f"{builtin_names()}); nothing is downloaded"
    )


def load_model(
    path_or_preset: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    load_format: str = "auto",
    seed: int = 0,
) -> LlamaForCausalLM:
    """Build the model and load its weights (see module docstring).

    dtype: None takes the checkpoint's (`config.dtype`). load_format: "auto"/"safetensors" read
    `*.safetensors` from the directory; "dummy" draws random weights (presets need it).
    device "meta" with "dummy" builds shapes only (no memory), e.g. to plan memory.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; expected one of {LOAD_FORMATS}")
    config, directory = resolve_config(path_or_preset)
    if directory is None and load_format != "dummy":
        raise ValueError(
            f"preset {config.name!r} has no weights; pass load_format='dummy' for random ones"
        )
    torch_dtype = parse_dtype(dtype if dtype is not None else config.dtype)
    device = torch.device(device)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=torch_dtype).to_empty(device=device)
    if device.type == "meta":  # shapes only (planning, parameter counts): nothing to fill
        if load_format != "dummy":
            raise ValueError("device 'meta' holds no data: use it with load_format='dummy'")
        return model.eval()
    model.init_buffers()
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        assert directory is not None
        load_safetensors(model, directory)
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Random weights for benchmarks: N(0, std) matrices, zero biases, unit norms.

    With std 0.02 a projection's output has std ~0.02*sqrt(fan_in) (~1.3 at 4096), so residual
    activations stay O(10) over dozens of layers: finite in bf16, logits not saturated.
    """
    gen = torch.Generator(device=model.head_weight().device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint (from the shard index when there is one)."""
    index = directory / INDEX_FILE
    if index.is_file():
        with open(index) as fh:
            names = sorted(set(json.load(fh)["weight_map"].values()))
        files = [directory / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in directory.glob("*.bin")) + sorted(
            p.name for p in directory.glob("*.pt*")
        )
        hint = f" (found {others}: only safetensors are supported)" if others else ""
        raise FileNotFoundError(f"no *.safetensors weights in {str(directory)!r}{hint}")
    return files


def _target(
    model: LlamaForCausalLM, params: Mapping[str, torch.Tensor], hf_name: str
) -> tuple[torch.Tensor, int, int] | None:
    """Map a checkpoint name to (param, first row, rows); None = a tensor we skip."""
    if _IGNORED.search(hf_name):
        return None
    if hf_name == "lm_head.weight" and model.lm_head is None:
        return None  # tied: the embedding is the head
    m = _LAYER_NAME.match(hf_name)
    if m is None:
        if hf_name not in params:
            raise ValueError(f"unexpected tensor {hf_name!r} in the checkpoint")
        p = params[hf_name]
        return p, 0, p.shape[0]
    fused, part = _FUSED[m.group(2)]
    name = f"{m.group(1)}.{fused}.{hf_name[m.end() :]}"
    if name not in params:
        raise ValueError(f"unexpected tensor {hf_name!r} in the checkpoint (no {name!r})")
    module = model.get_submodule(f"{m.group(1)}.{fused}")
    assert isinstance(module, FusedLinear)
    start, rows = module.shard_offset(part)
    return params[name], start, rows


def expected_tensor_names(model: LlamaForCausalLM) -> set[str]:
    """The checkpoint tensor names that together fill every parameter of `model`."""
    names = set()
    for name, _ in model.named_parameters():
        sources = [
            name.replace(fused, src) for src, (fused, _) in _FUSED.items() if f".{fused}." in name
        ]
        names.update(sources or [name])
    return names


@torch.no_grad()
def load_safetensors(model: LlamaForCausalLM, directory: Path) -> None:
    """Copy every checkpoint tensor into its (slice of a) parameter, checking shapes and coverage."""

    def tensors() -> Iterator[tuple[str, str, torch.Tensor]]:
        for file in checkpoint_files(directory):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for hf_name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if _target(model, params, hf_name) is not None:
                        yield file.name, hf_name, f.get_tensor(hf_name)

    params = dict(model.named_parameters())
    _load(model, tensors(), f"checkpoint {str(directory)!r}")


@torch.no_grad()
def load_hf_state_dict(model: LlamaForCausalLM, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Fill `model` from a Hugging Face model's `state_dict()` (same names as its checkpoints)."""
    _load(model, (("state_dict", k, v) for k, v in state_dict.items()), "state dict")


def _load(
    model: LlamaForCausalLM, tensors: Iterable[tuple[str, str, torch.Tensor]], source: str
) -> None:
    device = model.head_weight().device
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for where, hf_name, tensor in tensors:
        target = _target(model, params, hf_name)
        if target is None:
            continue
        param, start, rows = target
        want = (rows, *param.shape[1:])
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"tensor {hf_name!r} in {where} has shape {tuple(tensor.shape)}, expected {want}"
            )
        param[start : start + rows].copy_(tensor.to(device))
        loaded.add(hf_name)
    missing = sorted(expected_tensor_names(model) - loaded)
    if missing:
        shown = missing[:8] + (["..."] if len(missing) > 8 else [])
        raise ValueError(f"{source} lacks {len(missing)} tensor(s): {shown}")
