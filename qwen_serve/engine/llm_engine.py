"""The offline engine: add_request / abort_request / step, driving scheduler -> runner -> outputs.

`step()` = `scheduler.schedule()` -> `executor.launch()` -> collect the sampled tokens, append them,
decide stops, free finished sequences -> one `RequestOutput` per request that produced something
(with deltas for streaming; a request whose params ask for RequestOutputKind.FINAL_ONLY only when it
finishes). Single-threaded; the async front end (engine/async_engine.py) runs it
in a thread. The model lives behind an executor (engine/executor.py): a runner in this process, or
tensor-parallel worker processes; either way a step crosses to it as plain data (engine/step_builder.py).

Overlapped steps (on with CUDA): a step is collected by the *next* call, after that call has
scheduled and launched its successor, so the host's scheduling, input preparation and output
processing run while the GPU computes instead of between its steps. A sequence is then one token
ahead of its token_ids while the step is in flight (Sequence.num_pending_tokens; the runner reads
that token on the device). The cost: a sequence that turns out to have finished (eos, a stop
string) computes one more token, which is dropped. Steps whose next step needs the host to know
the tokens (penalties count them, grammars advance on them) are collected at once.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from qwen_serve.config import EngineConfig
from qwen_serve.engine.block_manager import BlockManager
from qwen_serve.engine.executor import make_executor
from qwen_serve.engine.output_processor import OutputProcessor
from qwen_serve.engine.outputs import EngineStats, RequestOutput
from qwen_serve.engine.request import Request, Sequence
from qwen_serve.engine.sampling_params import RequestOutputKind, SamplingParams, defaults_from_generation_config
from qwen_serve.engine.scheduler import Scheduler, SchedulerOutput, drafts_allowed
from qwen_serve.engine.speculative import (NgramProposer, ShadowDrafts, SpeculationGate, SpeculationStats,
                                           SpeculativeConfig, make_proposer)
from qwen_serve.engine.step_builder import build_step_input
from qwen_serve.models.config import ModelConfig
from qwen_serve.worker.step_input import SampledToken
from qwen_serve.worker.worker import WorkerSpec

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class LLMEngine:
    def __init__(self, config: EngineConfig, folder: Path | None = None, model_config: ModelConfig | None = None,
                 tokenizer: Any = None, generation_config: dict[str, Any] | None = None) -> None:
        """`folder`: a resolved HF-style model folder; or `folder=None` with `model_config` for random weights."""
        from qwen_serve.loader.model_loader import load_generation_config, load_model_config, resolve_dtype

        self.config = config
        if folder is not None:
            model_config = load_model_config(folder, config.rope_scaling)
            if generation_config is None:
                generation_config = load_generation_config(folder)
            if tokenizer is None:
                tokenizer_folder = Path(config.tokenizer) if config.tokenizer else folder
                tokenizer = _load_tokenizer(tokenizer_folder, config.chat_template)
            elif config.chat_template is not None:
                raise ValueError("--chat-template applies to the tokenizer the engine loads; give the template to the "
                                 "tokenizer passed in instead")
        elif model_config is None:
            raise ValueError("LLMEngine needs a model folder or a model config")
        self.model_config = model_config
        self.generation_config = generation_config or {}
        self.tokenizer = tokenizer
        self.max_model_len = min(config.max_model_len or model_config.max_context, model_config.max_context)
        self.device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, self.device, model_config)
        self.eos_token_ids = _eos_ids(tokenizer, self.generation_config, model_config)

        self.dtype = dtype
        spec = WorkerSpec(folder, model_config, config, dtype, self.max_model_len, self.eos_token_ids)
        self.executor = make_executor(spec, self.device)
        num_blocks = self.executor.num_blocks
        if num_blocks * config.block_size < self.max_model_len:
            # A lone sequence must always fit, or preemption could not make progress.
            self.executor.close()
            raise ValueError(f"the KV cache holds {num_blocks * config.block_size} tokens, less than "
                             f"max_model_len {self.max_model_len}: lower --max-model-len or give the cache more memory")
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.speculative = SpeculativeConfig.parse(config.speculative_config)
        self.spec_stats = SpeculationStats()
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len)
        if self.speculative is not None:
            try:
                self.scheduler.proposer = make_proposer(self.speculative, self)
            except BaseException:
                self.executor.close()
                raise
        self.overlap = config.overlap_steps == "on" or (config.overlap_steps == "auto" and self.device.type == "cuda")
        self._in_flight: _Launched | None = None  # launched, not yet collected (overlapped steps only)
        # When a list, each step's (time.perf_counter() when its results reached the host, tokens, sequences)
        # is appended: from one to the next is the later step's time, and the host's between steps where they
        # do not overlap (bench suite's step times by size).
        self.step_log: list[tuple[float, int, int]] | None = None
        # Where steps are not overlapped (the CPU) a verify step costs about a plain one, so drafts never
        # cost more than they gain and the gate stays open. Lookup drafts cost nothing to make, so a closed
        # gate learns from drafts it does not verify instead of from probes.
        shadow = isinstance(self.scheduler.proposer, NgramProposer)
        self.spec_gate = SpeculationGate(shadow=shadow) if self.overlap else SpeculationGate(min_gain=0.0, shadow=shadow)
        self.shadow = ShadowDrafts(self.scheduler.proposer, self.speculative.num_speculative_tokens) if shadow else None
        self.outputs = OutputProcessor(tokenizer, self.eos_token_ids, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self._defaults = defaults_from_generation_config(self.generation_config)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        from qwen_serve.loader.resolve import resolve_model

        return cls(config, resolve_model(config.model))

    def default_sampling_params(self) -> dict[str, Any]:
        """SamplingParams fields the model's generation_config.json sets (for fields a request leaves out)."""
        return dict(self._defaults)

    # ---- requests ------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        params = (params or SamplingParams()).with_defaults(self._defaults).validate()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: give the prompt as token ids")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        if not token_ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias: token ids must be in [0, {vocab})")
        if params.allowed_token_ids and max(params.allowed_token_ids) >= vocab:
            raise ValueError(f"allowed_token_ids: token ids must be in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; max_model_len is {self.max_model_len}, "
                             "which leaves no room to generate")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n ({params.n}) is larger than max_num_seqs ({self.config.max_num_seqs})")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        request = Request(request_id, token_ids, params, arrival_time or time.time(), text)
        if params.structured_output is not None:
            request.sample_constraints = self._new_constraints(params)
            request.sequences[0].constraint = request.sample_constraints[0]
        self.requests[request_id] = request
        self.scheduler.add_request(request)

    def _new_constraints(self, params: SamplingParams) -> list[Any]:
        if self.tokenizer is None:
            raise ValueError("structured_output needs a tokenizer")
        import qwen_serve.structured as structured  # written separately; imported only when used

        vocab = self.model_config.vocab_size  # the logits' width, which may exceed the tokenizer's
        return [structured.new_constraint(params.structured_output, self.tokenizer, vocab_size=vocab)
                for _ in range(params.n)]

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        self.scheduler.finish_request(request)
        self.outputs.drop(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        # Speculation pays while decode is bound by reading the weights (few sequences); its steps are not
        # overlapped, since drafts are proposed from each sequence's last token, which must be on the host.
        may = self.speculative is not None and len(self.scheduler.running) <= self.speculative.disable_by_batch_size
        speculate = may and self.spec_gate.open()
        sched = self.scheduler.schedule(speculate)
        if self.shadow is not None:
            for seq_id in sched.finished_seq_ids:
                self.shadow.forget(seq_id)
            if may and not speculate:
                for chunk in sched.chunks:
                    if chunk.num_tokens == 1 and chunk.sample_seqs == [chunk.seq] and drafts_allowed(chunk.seq):
                        self.shadow.propose(chunk.seq.seq_id, chunk.seq.token_ids)
        now = time.time()
        for chunk in sched.chunks:
            request = chunk.seq.request
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
        previous, self._in_flight = self._in_flight, None
        try:
            handle = _Launched(sched, self.executor.launch(build_step_input(sched, self.model_config.vocab_size)),
                               speculate)
        except BaseException:
            if previous is not None:
                self._forget(previous)
            raise
        for seq in handle.seqs:
            seq.num_pending_tokens += 1
        outputs = []
        try:
            if previous is not None:
                outputs += self._collect(previous)
        except BaseException:
            self._forget(handle)
            raise
        if self.overlap and not speculate and _can_overlap(handle.seqs):
            self._in_flight = handle
        else:
            outputs += self._collect(handle)
        return outputs

    def _collect(self, handle: "_Launched") -> list[RequestOutput]:
        """Waits for a launched step; appends its tokens, decides stops, frees finished sequences."""
        try:
            result = self.executor.collect(handle.ticket)
        finally:
            self._forget(handle)
        if self.step_log is not None:
            self.step_log.append((time.perf_counter(), handle.num_tokens, handle.num_chunks))
        now = time.time()
        self.outputs.add_prompt_logprobs([(handle.chunk_seq(p.seq_id), p) for p in result.prompt_logprobs])
        touched: dict[str, Request] = {}
        if len(result.sampled) != handle.num_rows:
            raise RuntimeError(f"the step sampled {len(result.sampled)} rows, not {handle.num_rows}")
        rows = iter(result.sampled)  # the step's sampling rows, in order: 1 + drafts for each sequence
        step_accepted = 0
        for seq, drafts in handle.samples:
            sampled = [next(rows) for _ in range(1 + len(drafts))]
            request = seq.request
            if seq.is_finished:  # aborted, or finished by the step before (overlapped): drop it
                continue
            if request.first_token_time is None:
                request.first_token_time = now
            accepted = self._append(seq, sampled, drafts)
            if self.shadow is not None:
                for would_accept in self.shadow.resolve(seq.seq_id, seq.token_ids):
                    self.spec_gate.record_shadow(would_accept)
                if seq.is_finished:
                    self.shadow.forget(seq.seq_id)
            if drafts:
                self.spec_stats.num_drafts += 1
                self.spec_stats.num_draft_tokens += len(drafts)
                self.spec_stats.num_accepted_tokens += accepted
                step_accepted += accepted
                if not seq.is_finished:
                    self.scheduler.rollback(seq, len(drafts) - accepted)
            touched[request.request_id] = request
        if handle.speculated:
            self.spec_gate.record(step_accepted, len(handle.samples))
        outputs = []
        for request in touched.values():
            finished = request.is_finished
            if finished:
                request.finished_time = now
                del self.requests[request.request_id]
            elif request.params.output_kind is RequestOutputKind.FINAL_ONLY:
                continue
            outputs.append(self.outputs.make_output(request, finished))
        return outputs

    def _append(self, seq: Sequence, sampled: list[SampledToken], drafts: list[int]) -> int:
        """Appends a sequence's sampled tokens: its row's, or with drafts, each row's while the token sampled
        there equals the next draft (then one more); stops where the sequence finishes. Returns how many
        drafts were accepted."""
        for j, s in enumerate(sampled):
            if seq.request.params.max_tokens != 0:  # 0: only prompt logprobs; the output processor finishes it
                seq.token_ids.append(s.token_id)
            if self.outputs.append(seq, s.token_id, s.logprob, s.rank, s.top):
                self.scheduler.finish_sequence(seq)
                return j
            if j == len(drafts) or s.token_id != drafts[j]:
                return j
        return len(drafts)

    @staticmethod
    def _forget(handle: "_Launched") -> None:
        """The step's tokens are no longer pending: collected, or lost with a failed step."""
        for seq in handle.seqs:
            seq.num_pending_tokens -= 1

    def close(self) -> None:
        """Aborts what is left and frees the engine's device memory (benchmarks that build several
        engines in one process); the engine is unusable after."""
        for request_id in list(self.requests):
            self.abort_request(request_id)
        self._in_flight = None
        self.executor.close()
        if hasattr(self.scheduler.proposer, "close"):  # a draft model's engine
            self.scheduler.proposer.close()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_kv_blocks_total=bm.num_blocks,
            num_kv_blocks_free=bm.num_free_blocks,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            speculative=self.speculative is not None,
            spec_num_drafts=self.spec_stats.num_drafts,
            spec_num_draft_tokens=self.spec_stats.num_draft_tokens,
            spec_num_accepted_tokens=self.spec_stats.num_accepted_tokens,
        )


class _Launched:
    """A step handed to the executor: its ticket there and the sequences behind its rows."""

    __slots__ = ("ticket", "seqs", "samples", "num_rows", "speculated", "_chunks")

    def __init__(self, sched: SchedulerOutput, ticket: Any, speculated: bool = False) -> None:
        self.ticket = ticket
        self.speculated = speculated  # drafts were asked for (the gate counts what they gained)
        # The sampling sequences, in order, each with its drafts (it samples 1 + that many rows).
        self.samples = [(s, chunk.draft_token_ids) for chunk in sched.chunks for s in chunk.sample_seqs]
        self.seqs = [s for s, _ in self.samples]
        self.num_rows = sum(1 + len(d) for _, d in self.samples)
        self._chunks = sched.chunks

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self._chunks)

    @property
    def num_chunks(self) -> int:
        return len(self._chunks)

    def chunk_seq(self, seq_id: int) -> Sequence:
        return next(c.seq for c in self._chunks if c.seq.seq_id == seq_id)


def _can_overlap(seqs: list[Sequence]) -> bool:
    """Whether the next step can be launched before these sequences' tokens reach the host:
    not when penalties count the tokens or a grammar must advance on them first."""
    for seq in seqs:
        p = seq.request.params
        if seq.constraint is not None or p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 \
                or p.presence_penalty != 0.0:
            return False
    return True


def _load_tokenizer(folder: Path, chat_template: str | None) -> Any:
    """The folder's tokenizer, with `chat_template` (a --chat-template value) in place of its own template."""
    if not (folder / "tokenizer.json").is_file():
        if chat_template is not None:
            raise ValueError(f"--chat-template needs a tokenizer, and {folder} has no tokenizer.json")
        log.warning("no tokenizer.json in %s: prompts must be token ids", folder)
        return None
    from qwen_serve.tokenizer.chat_template import read_chat_template
    from qwen_serve.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_folder(folder, read_chat_template(chat_template) if chat_template is not None else None)


def _eos_ids(tokenizer: Any, generation_config: dict[str, Any], cfg: ModelConfig) -> list[int]:
    if tokenizer is not None and tokenizer.eos_token_ids:
        return list(tokenizer.eos_token_ids)
    ids: list[int] = []
    for value in (generation_config.get("eos_token_id"), cfg.eos_token_id):
        if value is not None:
            ids.extend(value if isinstance(value, list) else [value])
    return list(dict.fromkeys(ids))
