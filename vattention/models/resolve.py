"""`resolve_model`: what the user names a model by -> a path or preset `load_model` reads.

- a `.gguf` file (or any file starting with the GGUF magic) -> its converted, cached HF-style
  directory (`vattention.models.gguf.gguf_checkpoint_dir`);
- a directory without `config.json` that holds exactly one `.gguf` -> that file's directory;
  several -> ValueError listing them;
- a built-in name (`vattention.models.builtin`, e.g. `smollm2-135m-instruct`) -> its GGUF,
  converted the same way;
- anything else (HF directories, presets, unknown names) -> unchanged, for `load_model` to read
  or reject. An existing path wins over a built-in name.
Resolution is idempotent: a resolved directory resolves to itself.
"""

from __future__ import annotations

from pathlib import Path

from vattention.models.builtin import builtin_gguf_path, is_builtin


def resolve_model(name_or_path: str | Path, cache_dir: str | Path | None = None) -> str:
    """A local HF-style directory for GGUF files and built-in names; the input otherwise."""
    from vattention.models import gguf

    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf" or gguf.is_gguf_file(path):
            return str(gguf.gguf_checkpoint_dir(path, cache_dir))
        return text
    if path.is_dir():
        if (path / "config.json").is_file():
            return text
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(files) == 1:
            return str(gguf.gguf_checkpoint_dir(files[0], cache_dir))
        if len(files) > 1:
            raise ValueError(
                f"directory {text!r} holds {len(files)} GGUF files ({[f.name for f in files]}); "
                "pass the one to load"
            )
        return text
    if path.suffix.lower() == ".gguf":
        raise FileNotFoundError(f"GGUF file {text!r} does not exist")
    if is_builtin(text):
        return str(gguf.gguf_checkpoint_dir(builtin_gguf_path(text), cache_dir))
    return text
