"""From sampled tokens to user-facing outputs: detokenization, stop decisions, logprobs, deltas.

One `SampleState` per sequence keeps the streamed text (through the incremental detokenizer and
the stop-string checker) and what changed since the last step. `append` decides whether a
sequence is finished: eos / stop_token_ids (after min_tokens), stop strings, max_tokens,
max_model_len, or a structured-output grammar that is complete. A request's prompt logprobs
arrive chunk by chunk (`add_prompt_logprobs`) and are kept per request until it finishes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qwen_serve.engine.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from qwen_serve.engine.request import Request, Sequence
from qwen_serve.engine.stop import StopStringChecker

if TYPE_CHECKING:
    from qwen_serve.worker.step_input import PromptLogprobs


class SampleState:
    __slots__ = ("detok", "stop", "finish_reason", "stop_reason", "logprobs", "cumulative_logprob",
                 "delta_text", "delta_token_ids", "delta_logprobs")

    def __init__(self, detok: Any, stop: StopStringChecker, want_logprobs: bool) -> None:
        self.detok = detok
        self.stop = stop
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[PositionLogprobs] | None = [] if want_logprobs else None
        self.cumulative_logprob: float | None = 0.0 if want_logprobs else None
        self.delta_text = ""
        self.delta_token_ids: list[int] = []
        self.delta_logprobs: list[PositionLogprobs] | None = [] if want_logprobs else None


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_token_ids: list[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.states: dict[int, SampleState] = {}
        self.prompt_logprobs: dict[str, list[PositionLogprobs | None]] = {}  # request id -> entries so far
        self._token_text: dict[int, str] = {}

    def state(self, seq: Sequence) -> SampleState:
        st = self.states.get(seq.seq_id)
        if st is None:
            params = seq.request.params
            detok = None
            if self.tokenizer is not None:
                from qwen_serve.tokenizer.detokenizer import IncrementalDetokenizer

                detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            stop = StopStringChecker(params.stop_strings, params.include_stop_str_in_output)
            st = self.states[seq.seq_id] = SampleState(detok, stop, params.logprobs is not None)
        return st

    def append(self, seq: Sequence, token_id: int, logprob: float | None, rank: int | None,
               top: list[tuple[int, float]] | None) -> bool:
        """Records one sampled token (already appended to seq.token_ids); True if the sequence is done."""
        st = self.state(seq)
        params = seq.request.params
        if params.max_tokens == 0:  # only the prompt's logprobs were wanted: the engine kept no token
            st.finish_reason = "length"
            return True
        st.delta_token_ids.append(token_id)
        if st.logprobs is not None:
            entry = self._position(token_id, logprob, rank, top or [])
            st.logprobs.append(entry)
            st.delta_logprobs.append(entry)
            st.cumulative_logprob += logprob

        n_out = seq.num_output_tokens
        may_stop = n_out >= params.min_tokens
        stop_token = False
        if may_stop and not params.ignore_eos and token_id in self.eos_token_ids:
            stop_token, st.finish_reason = True, "stop"
        elif may_stop and params.stop_token_ids and token_id in params.stop_token_ids:
            stop_token, st.finish_reason, st.stop_reason = True, "stop", token_id
        if st.detok is not None and (not stop_token or params.include_stop_str_in_output):
            st.delta_text += st.stop.add(st.detok.add([token_id]), check=may_stop)
            if st.stop.stop_reason is not None:
                st.finish_reason, st.stop_reason = "stop", st.stop.stop_reason
        if st.finish_reason is None and seq.constraint is not None:
            if seq.constraint_waits_for is not None:  # still thinking: the grammar starts after its end
                if token_id == seq.constraint_waits_for:
                    seq.constraint_waits_for = None
            elif not seq.constraint.accept(token_id) or seq.constraint.is_finished():
                st.finish_reason = "stop"
        if st.finish_reason is None and (
            (params.max_tokens is not None and n_out >= params.max_tokens) or seq.num_tokens >= self.max_model_len
        ):
            st.finish_reason = "length"
        if st.finish_reason is not None and st.detok is not None and st.stop.stop_reason is None:
            st.delta_text += st.stop.add(st.detok.flush(), check=may_stop) + st.stop.flush()
            if st.stop.stop_reason is not None:
                st.finish_reason, st.stop_reason = "stop", st.stop.stop_reason
        return st.finish_reason is not None

    def add_prompt_logprobs(self, chunks: list[tuple[Sequence, "PromptLogprobs"]]) -> None:
        """Records one step's prompt-logprob entries, each with its sequence. A prompt computed again
        after preemption brings entries already recorded (the same values): only new positions are kept."""
        for seq, c in chunks:
            if seq.is_finished:  # aborted while its step was in flight
                continue
            entries = self.prompt_logprobs.setdefault(seq.request.request_id, [None])
            for i, (lp, rank, top) in enumerate(zip(c.logprobs, c.ranks, c.top)):
                if c.first + i == len(entries):
                    entries.append(self._position(seq.token_ids[c.first + i], lp, rank, top))

    def drop(self, request: Request) -> None:
        for seq in request.sequences:
            self.states.pop(seq.seq_id, None)
        self.prompt_logprobs.pop(request.request_id, None)

    def _position(self, token_id: int, logprob: float, rank: int, top: list[tuple[int, float]]) -> PositionLogprobs:
        """The top alternatives (ranks 1..k) and the chosen token, which may be among them."""
        entry = {tid: Logprob(lp, r + 1, self._decode_one(tid)) for r, (tid, lp) in enumerate(top)}
        entry[token_id] = Logprob(logprob, rank, self._decode_one(token_id))
        return entry

    def _decode_one(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = "" if self.tokenizer is None else self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def make_output(self, request: Request, finished: bool) -> RequestOutput:
        """The request's outputs so far with this step's deltas; resets the deltas."""
        outputs = []
        for seq in request.sequences:
            st = self.state(seq)
            outputs.append(CompletionOutput(
                index=seq.sample_index,
                text=st.stop.text[: st.stop.emitted],
                token_ids=seq.output_token_ids,
                finish_reason=st.finish_reason,
                stop_reason=st.stop_reason,
                logprobs=list(st.logprobs) if st.logprobs is not None else None,
                cumulative_logprob=st.cumulative_logprob,
                delta_text=st.delta_text,
                delta_token_ids=st.delta_token_ids,
                delta_logprobs=st.delta_logprobs,
            ))
            st.delta_text, st.delta_token_ids = "", []
            st.delta_logprobs = [] if st.logprobs is not None else None
        seqs = request.sequences
        metrics = RequestMetrics(
            arrival_time=request.arrival_time,
            first_scheduled_time=request.first_scheduled_time,
            first_token_time=request.first_token_time,
            finished_time=request.finished_time,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_generation_tokens=sum(s.num_output_tokens for s in seqs),
            num_cached_tokens=seqs[0].num_cached_tokens,
        )
        prompt_logprobs = None
        if request.params.prompt_logprobs is not None:
            # A one-token prompt has no chunk entries: only the first token's None.
            prompt_logprobs = self.prompt_logprobs.setdefault(request.request_id, [None])
        if finished:
            for seq in seqs:
                self.states.pop(seq.seq_id, None)
            self.prompt_logprobs.pop(request.request_id, None)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs, finished, metrics,
                             prompt_logprobs)
