"""A CPU install has no Triton (torch's CPU wheel does not bring it): quantized models, GGUF block formats among
them, still load and generate there. Run in a child process whose imports of `triton` fail, as on such a
machine (this one has Triton through the test extra)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_gguf import _blocks
from test_loading import _tiny_vocab, write_tiny_gguf

from conftest import make_tiny_checkpoint

CHILD = """
import sys

class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoTriton())
from pathlib import Path
from qwen_serve.config import EngineConfig
from qwen_serve.engine.llm_engine import LLMEngine
from qwen_serve.engine.sampling_params import SamplingParams
from qwen_serve.layers.options import triton_available
from qwen_serve.loader.resolve import resolve_model

assert not triton_available() and "triton" not in sys.modules
folder = Path(resolve_model(sys.argv[1]))
engine = LLMEngine(EngineConfig(model=str(folder), dtype="bfloat16", device="cpu", max_model_len=64,
                                num_kv_blocks=32, block_size=4), folder)
engine.add_request("0", [5, 77, 260, 3], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
done = []
while engine.has_unfinished_requests():
    done += [o for o in engine.step() if o.finished]
assert len(done[0].outputs[0].token_ids) == 3 and "triton" not in sys.modules
print("ok")
"""


def test_a_block_format_gguf_runs_without_triton(tmp_path):
    hf = make_tiny_checkpoint(tmp_path / "hf", heads=4, kv_heads=2, vocab=len(_tiny_vocab()[0]), hidden=256)
    gguf = write_tiny_gguf(tmp_path / "mixed.gguf", hf, blocks=_blocks)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", CHILD, str(gguf)], cwd=root, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "QWEN_SERVE_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
