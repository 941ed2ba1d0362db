"""Turns a model spec into a local HF-style folder (config.json, tokenizer files, safetensors).

Specs, in the order they are tried: 'demo' (the packaged Qwen2.5-Coder-0.5B-Instruct), an existing
folder, an existing .gguf file (converted once into the cache), a path-like spec that does not
exist (an error), otherwise a hub id.
"""

from __future__ import annotations

import re
from pathlib import Path

from qwen_serve.loader import demo, gguf_convert, hub

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _check_folder(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder: it has no config.json")
    return folder


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", "."))
        or spec.endswith(".gguf")
        or "\\" in spec
        or not _HUB_ID.match(spec)
    )


def resolve_model(spec: str) -> Path:
    """A local model folder for `spec` (see the module docstring for what a spec can be)."""
    spec = spec.strip()
    if not spec:
        raise ValueError("no model given")
    if spec == "demo":
        return demo.demo_model_folder()
    path = Path(spec).expanduser()
    if path.is_dir():
        return _check_folder(path.resolve())
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
        if path.suffix.lower() == ".gguf" or magic == gguf_convert.GGUF_MAGIC:
            return gguf_convert.convert_gguf(path.resolve())
        raise ValueError(f"{spec} is neither a model folder nor a .gguf file")
    if _looks_like_path(spec):
        raise FileNotFoundError(f"no such file or folder: {spec}")
    return _check_folder(hub.download(spec))
