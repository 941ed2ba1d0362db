"""`LLM`: the offline API users know from vLLM - `generate` over many prompts, `chat` through the template.

A thin loop over `LLMEngine`: add every prompt, step until all finish, return outputs in prompt order.
As vLLM's does, it asks the engine for final outputs only (RequestOutputKind.FINAL_ONLY): nobody reads
the outputs of the steps in between.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

from qwen_serve.config import EngineConfig
from qwen_serve.engine.llm_engine import LLMEngine
from qwen_serve.engine.outputs import RequestOutput
from qwen_serve.engine.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str = "demo", **kwargs: Any) -> None:
        """Keyword arguments are EngineConfig fields (dtype, max_model_len, max_num_seqs, ...)."""
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown LLM arguments: {', '.join(unknown)}")
        self.engine = LLMEngine.from_config(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine, llm._ids = engine, itertools.count()
        return llm

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts are strings or token-id lists."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        final_only = {id(p): _final_only(p) for p in params}  # one copy per distinct object, not per prompt
        ids = []
        for prompt, p in zip(prompts, params):
            request_id = f"llm-{next(self._ids)}"
            self.engine.add_request(request_id, prompt, final_only[id(p)])
            ids.append(request_id)
        return self._run(ids, use_tqdm and len(ids) > 1)

    def chat(self, messages: Messages | Sequence[Messages], sampling_params: SamplingParams | None = None,
             tools: list[dict[str, Any]] | None = None, use_tqdm: bool = True, **template_kwargs: Any) -> list[RequestOutput]:
        """Renders each conversation with the model's chat template, then generates."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [tokenizer.apply_chat_template(m, tools=tools, add_generation_prompt=True, **template_kwargs)
                   for m in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], progress: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="Generating", unit="req")
        wanted = set(ids)
        try:
            while len(done) < len(wanted):
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError("the engine finished without answering every prompt")
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in wanted - done.keys():
                self.engine.abort_request(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]


def _final_only(params: SamplingParams) -> SamplingParams:
    """A copy of the caller's params (left as they are) that asks for the final output only."""
    out = params.clone()
    out.output_kind = RequestOutputKind.FINAL_ONLY
    return out
