"""Turns a model spec into a local HF-style folder (config.json, tokenizer files, safetensors)."""

from __future__ import annotations

from pathlib import Path


def _check_folder(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder: it has no config.json")
    return folder


def resolve_model(spec: str) -> Path:
    """A local model folder for `spec` (an HF checkpoint folder)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _check_folder(path.resolve())
    raise FileNotFoundError(f"no such model folder: {spec}")
