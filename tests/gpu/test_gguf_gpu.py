"""A GGUF of every block format served on CUDA: the input table looked up from the file's own blocks, the
linears from their codes, against the CPU's float32 model of the same file (dequantized at load); and the
engine's decode CUDA graphs (the table's lookup captured in them) against its eager steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_tiny_checkpoint
from qwen_serve.config import EngineConfig
from qwen_serve.engine.llm import LLM
from qwen_serve.engine.llm_engine import LLMEngine
from qwen_serve.engine.sampling_params import SamplingParams
from test_gguf import _blocks
from test_loading import _tiny_vocab, write_tiny_gguf

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """The mixed-format tiny GGUF (weights scaled up before quantizing, so greedy choices have clear
    margins), resolved into its cache folder."""
    from safetensors.torch import load_file, save_file

    from qwen_serve.loader.resolve import resolve_model

    tmp = tmp_path_factory.mktemp("gguf_gpu")
    hf = make_tiny_checkpoint(tmp / "hf", heads=4, kv_heads=2, vocab=len(_tiny_vocab()[0]), hidden=256, max_pos=512)
    path = hf / "model.safetensors"
    save_file({n: t * 4 if t.dim() == 2 else t for n, t in load_file(path).items()}, path, metadata={"format": "pt"})
    gguf = write_tiny_gguf(tmp / "mixed.gguf", hf, blocks=_blocks)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QWEN_SERVE_CACHE", str(tmp / "cache"))
        return Path(resolve_model(str(gguf)))


def test_block_table_and_codes_on_cuda_match_the_cpu(mixed_folder):
    from qwen_serve.layers.attention import AttentionMetadata, forward_context
    from qwen_serve.loader.model_loader import load_model, load_model_config

    cfg = load_model_config(mixed_folder)
    ids = [5, 77, 260, 3, 99, 200, 1, 42]
    logits = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        model = load_model(mixed_folder, cfg, dtype, device)
        type_name, blocks = model.model.embed_tokens.gguf_table
        assert type_name == "Q5_0" and blocks.device.type == device and blocks.dtype == torch.uint8
        with torch.no_grad(), forward_context(AttentionMetadata.prefill_without_cache([len(ids)])):
            logits[device] = model.compute_logits(model(torch.tensor(ids, device=device),
                                                        torch.arange(len(ids), device=device))).float().cpu()
    ref = logits["cpu"]
    assert ((logits["cuda"] - ref).norm() / ref.norm()).item() < 2e-2  # bfloat16 activations


def test_decode_graphs_with_the_block_table_match_eager(mixed_folder):
    gen = torch.Generator().manual_seed(0)
    vocab = len(_tiny_vocab()[0])
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (1, 5, 9, 13, 3, 30, 7)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    tokens = {}
    for eager in (True, False):
        engine = LLMEngine(EngineConfig(model=str(mixed_folder), dtype="float32", device="cuda", block_size=4,
                                        num_kv_blocks=256, max_model_len=128, max_num_seqs=8,
                                        enforce_eager=eager), mixed_folder)
        assert (engine.executor.runner.graphs is None) == eager
        outs = LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
        tokens[eager] = [o.outputs[0].token_ids for o in outs]
    assert tokens[False] == tokens[True]
