"""Hugging Face checkpoint folders: config.json plus one or many safetensors files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder, in the order model.safetensors.index.json lists them."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names weight files that are missing: {', '.join(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return files


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields tensors one at a time from memory-mapped files: never two full copies in memory."""
    for path in safetensors_files(folder):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise ValueError(f"{path}: cannot read safetensors file ({e})") from e
        with handle as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
