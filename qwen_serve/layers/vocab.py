"""The vocabulary table: token embedding and, for the lm_head, the projection back to vocabulary logits.

One module serves both, so a tied model's lm_head is its embedding table (the same module). Its
parameters come from the quantization config's `embedding_method` (unquantized except in formats
that store the table quantized, GGUF); the method looks rows up (`embedding`) and projects (`apply`).

Under tensor parallelism each rank holds ceil(V / N) consecutive rows (the last rank's tail is zero
padding): a lookup takes the ids in its range and the all-reduce adds the ranks' rows (one rank has
each id); logits are each rank's columns, gathered side by side and cut back to V.
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
        self.parallel = p = opts.parallel
        self.rows_per_rank = -(-vocab_size // p.size)
        self.first_row = p.rank * self.rows_per_rank
        self.used_for_lookup = False  # set by the model on its input table: its weight is not repacked
        self.used_for_logits = False  # set by the model on its lm_head (a tied table is both)
        quant = opts.quant_config
        self.quant_method: LinearMethod = quant.embedding_method(prefix) if quant else UnquantizedLinearMethod()
        if p.size > 1 and not isinstance(self.quant_method, UnquantizedLinearMethod):
            raise ValueError(f"{prefix}: a quantized vocabulary table cannot be split by --tensor-parallel-size yet")
        self.quant_method.create_weights(self, hidden_size, [self.rows_per_rank], params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        """The table is loaded whole, or this rank's rows of it (zeros past the vocabulary)."""
        if self.parallel.size == 1:
            default_weight_loader(param, loaded)
            return
        if tuple(loaded.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"expected shape {(self.vocab_size, self.hidden_size)}, checkpoint has {tuple(loaded.shape)}")
        rows = loaded[self.first_row : self.first_row + self.rows_per_rank]
        param.data.zero_()
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[num_tokens] token ids -> [num_tokens, hidden_size]."""
        if self.parallel.size == 1:
            return self.quant_method.embedding(self, ids)
        local = ids - self.first_row
        mine = (local >= 0) & (local < self.rows_per_rank)
        rows = self.quant_method.embedding(self, torch.where(mine, local, 0))
        return self.parallel.all_reduce(rows * mine[:, None].to(rows.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> [n, vocab_size] in the compute dtype."""
        logits = self.quant_method.apply(self, hidden, None)
        if self.parallel.size == 1:
            return logits
        return self.parallel.all_gather(logits)[:, : self.vocab_size]
