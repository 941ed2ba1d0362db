"""The vocabulary table: token embedding and, for the lm_head, the projection back to vocabulary logits.

One module serves both, so a tied model's lm_head is its embedding table (the same module). Its
parameters come from the quantization config's `embedding_method` (unquantized except in formats
that store the table quantized, GGUF); the method looks rows up (`embedding`) and projects (`apply`).
Tensor parallelism will split it by vocabulary rows.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_serve.layers.options import LayerOptions
from qwen_serve.layers.quantization.base import LinearMethod, default_weight_loader
from qwen_serve.layers.quantization.unquantized import UnquantizedLinearMethod


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, opts: LayerOptions, prefix: str,
                 params_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size, self.prefix = vocab_size, hidden_size, prefix
        self.fused = opts.fused
        self.used_for_lookup = False  # set by the model on its input table: its weight is not repacked
        quant = opts.quant_config
        self.quant_method: LinearMethod = quant.embedding_method(prefix) if quant else UnquantizedLinearMethod()
        self.quant_method.create_weights(self, hidden_size, [vocab_size], params_dtype)

    weight_loader = staticmethod(default_weight_loader)  # the table is always loaded whole

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[num_tokens] token ids -> [num_tokens, hidden_size]."""
        return self.quant_method.embedding(self, ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> [n, vocab_size] in the compute dtype."""
        return self.quant_method.apply(self, hidden, None)

