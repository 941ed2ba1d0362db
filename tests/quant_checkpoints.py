"""Quantized checkpoints made from random weights, packed by loops written from each format's
published layout (not by the code under test), with the dequantized weights they stand for.

AWQ (AutoAWQ "gemm"): w^T [K, N] in groups of G input rows; q = round(w / s) + z in [0, 15];
qweight [K, N/8] and qzeros [K/G, N/8] hold 8 columns a word, nibble j holding column AWQ_ORDER[j].
GPTQ (AutoGPTQ / GPTQModel): qweight [K*b/32, N] packs consecutive input rows into a word, lowest bits
first; qzeros [groups, N*b/32] packs consecutive columns alike and, in the v1 ("gptq") format, stores
each zero point minus one; g_idx [K] names each input row's group.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _codes(w: torch.Tensor, groups: torch.Tensor, num_groups: int, bits: int, sym: bool):
    """Asymmetric (or symmetric) min/max quantization of w [K, N] per (group, column):
    returns int codes [K, N], zero points [groups, N] and float16 scales [groups, N]."""
    top = (1 << bits) - 1
    scales = torch.empty(num_groups, w.shape[1])
    zeros = torch.empty(num_groups, w.shape[1], dtype=torch.int64)
    for g in range(num_groups):
        rows = w[groups == g]
        if sym:
            s = rows.abs().amax(0) * 2 / top
            z = torch.full((w.shape[1],), (top + 1) // 2, dtype=torch.int64)
        else:
            lo, hi = rows.amin(0).clamp(max=0), rows.amax(0).clamp(min=0)
            s = (hi - lo) / top
            z = torch.round(-lo / s).long().clamp(0, top)
        scales[g], zeros[g] = s, z
    scales = scales.half()
    q = (torch.round(w / scales.float()[groups]) + zeros[groups]).clamp(0, top).long()
    return q, zeros, scales


def _int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((words & 0xFFFFFFFF).astype(np.uint32).view(np.int32))


def awq_pack(q: torch.Tensor) -> torch.Tensor:
    """[R, C] 4-bit codes -> int32 [R, C/8] in AWQ's order."""
    q = q.numpy().astype(np.int64)
    out = np.zeros((q.shape[0], q.shape[1] // 8), dtype=np.int64)
    for word in range(out.shape[1]):
        for j, col in enumerate(AWQ_ORDER):
            out[:, word] |= q[:, 8 * word + col] << (4 * j)
    return _int32(out)


def gptq_pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] codes -> int32 [K*bits/32, N], consecutive rows in a word."""
    per = 32 // bits
    q = q.numpy().astype(np.int64)
    out = np.zeros((q.shape[0] // per, q.shape[1]), dtype=np.int64)
    for i in range(out.shape[0]):
        for j in range(per):
            out[i] |= q[per * i + j] << (bits * j)
    return _int32(out)


def gptq_pack_columns(z: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    z = z.numpy().astype(np.int64)
    out = np.zeros((z.shape[0], z.shape[1] // per), dtype=np.int64)
    for c in range(out.shape[1]):
        for j in range(per):
            out[:, c] |= (z[:, per * c + j] & ((1 << bits) - 1)) << (bits * j)
    return _int32(out)


def quantize_awq(weight: torch.Tensor, group_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """HF weight [N, K] -> (AWQ tensors, the dequantized weight [N, K] they stand for)."""
    w = weight.t().float()  # [K, N]
    groups = torch.arange(w.shape[0]) // group_size
    q, z, s = _codes(w, groups, w.shape[0] // group_size, 4, sym=False)
    tensors = {"qweight": awq_pack(q), "qzeros": awq_pack(z), "scales": s}
    return tensors, ((q - z[groups]).float() * s.float()[groups]).t().contiguous()


def quantize_gptq(weight: torch.Tensor, bits: int, group_size: int, desc_act: bool, sym: bool,
                  v1: bool = True, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    w = weight.t().float()  # [K, N]
    k = w.shape[0]
    size = k if group_size == -1 else group_size
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if desc_act else torch.arange(k)
    groups = torch.empty(k, dtype=torch.long)
    groups[order] = torch.arange(k) // size  # with desc_act a group's rows are scattered
    q, z, s = _codes(w, groups, k // size, bits, sym)
    tensors = {"qweight": gptq_pack_rows(q, bits), "qzeros": gptq_pack_columns(z - (1 if v1 else 0), bits),
               "scales": s, "g_idx": groups.to(torch.int32)}
    return tensors, ((q - z[groups]).float() * s.float()[groups]).t().contiguous()


def make_quantized_checkpoint(folder: Path, method: str, *, bits: int = 4, group_size: int = 32,
                              desc_act: bool = False, sym: bool = False, v1: bool = True,
                              tied: bool = False, seed: int = 0, llama: bool = False) -> tuple[Path, Path]:
    """A tiny random Qwen2 (or, with `llama`, a Llama 3.1-style Llama) quantized with `method` ('awq' or
    'gptq') in `folder / "quantized"`, and the same model with the dequantized weights, float32, in
    `folder / "dequantized"` (for transformers)."""
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, tie_word_embeddings=tied,
                 rope_theta=10000.0, eos_token_id=319, bos_token_id=318)
    if llama:
        cfg = transformers.LlamaConfig(**shape, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})
        model = transformers.LlamaForCausalLM(cfg).float().eval()
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape)).float().eval()
    quantized: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
        for name, p in list(model.named_parameters()):
            module = name.rsplit(".", 2)
            if name.endswith(".weight") and module[-2] in QUANTIZED:
                base = name.removesuffix(".weight")
                if method == "awq":
                    tensors, deq = quantize_awq(p, group_size)
                else:
                    # Projections of the same input share their act-order permutation (one Hessian), so their g_idx.
                    shared_input = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
                    seed = zlib.crc32(f"{name.split('.')[2]}.{shared_input.get(module[-2], module[-2])}".encode())
                    tensors, deq = quantize_gptq(p, bits, group_size, desc_act, sym, v1, seed=seed)
                p.copy_(deq)
                quantized.update({f"{base}.{k}": v for k, v in tensors.items()})
            elif not (tied and name == "lm_head.weight"):
                quantized[name] = p.detach().clone().half() if name.endswith(".bias") else p.detach().clone()
    deq_folder = folder / "dequantized"
    # The biases are float16 in these checkpoints: the reference uses the same values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(p.half().float())
    model.save_pretrained(deq_folder, safe_serialization=True)
    q_folder = folder / "quantized"
    q_folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in quantized.items()}, q_folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((deq_folder / "config.json").read_text())
    config["torch_dtype"] = "float16"
    if method == "awq":
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                         "version": "gemm", "zero_point": True}
    else:
        config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                         "desc_act": desc_act, "sym": sym,
                                         "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    (q_folder / "config.json").write_text(json.dumps(config))
    return q_folder, deq_folder
