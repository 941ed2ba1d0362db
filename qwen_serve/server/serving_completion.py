"""`POST /v1/completions`: raw prompts (text or token ids, one or a batch) for base models.

A batch of prompts becomes one engine request per prompt, run concurrently; choice `index` is
`prompt_index * n + sample_index`, as in OpenAI's API. `echo` puts the prompt's text in front of the
completion (in the choice's first chunk when streaming); `logprobs` gives OpenAI's legacy logprobs
shape, with `echo` covering the prompt's tokens first (the first one's logprob null: nothing predicts
it). `echo` with `max_tokens: 0` returns the prompt and its logprobs alone, which is how evaluation
harnesses score text; vLLM's `prompt_logprobs` field adds its own per-token shape beside them.
`suffix` asks for the text between the prompt and the suffix (fill in the middle), written in the
prompt format of the models trained for it (Qwen2.5-Coder's <|fim_prefix|>, <|fim_suffix|>,
<|fim_middle|> tokens); a model without those tokens answers 400.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from qwen_serve.engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from qwen_serve.server.errors import APIError
from qwen_serve.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptLogprob,
    PromptTokensDetails,
    UsageInfo,
)
from qwen_serve.server.serving import (
    SSE_DONE,
    Serving,
    SSEResponse,
    first_output,
    finite,
    json_response,
    merge_streams,
    random_id,
    sse,
    sse_error,
    top_entries,
    until_disconnected,
)

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")  # Qwen2.5-Coder's fill-in-the-middle format


def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs | None], k: int, text_start: int,
                        decode: Callable[[int], str]) -> CompletionLogprobs:
    """OpenAI's legacy shape; `text_offset` counts characters from the start of the choice's text.
    A position without logprobs (a prompt's first token) gets null logprob and top_logprobs."""
    out = CompletionLogprobs()
    offset = text_start
    for tok, pos in zip(token_ids, positions):
        chosen = pos.get(tok) if pos is not None else None
        text = chosen.decoded_token if chosen is not None else decode(tok)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if chosen is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(finite(chosen.logprob))
        tops = {lp.decoded_token: finite(lp.logprob) for _, lp in top_entries(pos, k)}
        tops.setdefault(chosen.decoded_token, finite(chosen.logprob))
        out.top_logprobs.append(tops)
    return out


def joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(text_offset=first.text_offset + then.text_offset,
                              token_logprobs=first.token_logprobs + then.token_logprobs,
                              tokens=first.tokens + then.tokens, top_logprobs=first.top_logprobs + then.top_logprobs)


def prompt_logprobs_field(entries: list[PositionLogprobs | None]) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs` of a choice: token id -> {logprob, rank, decoded_token} per position."""
    return [None if pos is None else
            {t: PromptLogprob(logprob=finite(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
             for t, lp in pos.items()} for pos in entries]


class _Prompt:
    __slots__ = ("ids", "text")

    def __init__(self, ids: list[int], text: str) -> None:
        self.ids = ids
        self.text = text


class CompletionServing(Serving):
    async def create(self, req: CompletionRequest, request: Request) -> Response:
        try:
            req.validate_fields()
            raw_prompts = req.prompts()
            asked = req.structured_spec()
        except ValueError as err:
            raise APIError.from_value_error(err) from None
        model = self.check_model(req.model)
        most = self.settings.max_prompts_per_request
        if len(raw_prompts) > most:
            raise APIError.bad_request(f"prompt: {len(raw_prompts)} prompts in one request; the limit is {most} "
                                       "(--max-prompts-per-request)", "prompt")
        self.check_ready(needed=len(raw_prompts))
        structured = await self.compile_structured(asked)
        if req.suffix is not None:
            raw_prompts = [self._fill_in_the_middle(p, req.suffix) for p in raw_prompts]
        prompts = [await self._prompt(p, i, len(raw_prompts), req.echo) for i, p in enumerate(raw_prompts)]
        limit = req.max_tokens if "max_tokens" in req.model_fields_set else (self.max_tokens_default() or req.max_tokens)
        requests = []
        base_id = random_id("cmpl")
        for i, p in enumerate(prompts):
            max_tokens = self._output_limit(len(p.ids), limit)
            params = self.sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs,
                                          structured_output=structured, prompt_logprobs=req.engine_prompt_logprobs,
                                          stream=bool(req.stream))
            rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
            requests.append(self.generate(p.ids, params, rid))
        merged = merge_streams(requests)
        first = await first_output(request, merged)
        if req.stream:
            return SSEResponse(self._stream(req, model, base_id, prompts, first, merged))
        finals = await until_disconnected(request, self._collect(first, merged))
        return json_response(self._response(req, model, base_id, prompts, finals))

    def _output_limit(self, prompt_len: int, limit: int | None) -> int:
        """max_tokens for the engine (checked against the context); 0 (echo only) still needs the
        prompt to leave room for a token, as the engine requires of every prompt."""
        if limit == 0:
            self.check_context(prompt_len, 1)
            return 0
        return self.check_context(prompt_len, limit)

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprobs(self, req: CompletionRequest, out: RequestOutput, token_ids: list[int],
                  positions: list[PositionLogprobs] | None, text_start: int, echo: bool) -> CompletionLogprobs | None:
        """A choice's legacy logprobs for these generated tokens; with `echo`, the prompt's tokens
        first, their offsets from the start of the text (the generated ones start at `text_start`)."""
        if req.logprobs is None:
            return None
        generated = completion_logprobs(token_ids, positions or [], req.logprobs, text_start, self._decode_token)
        if not echo:
            return generated
        prompt = completion_logprobs(out.prompt_token_ids, out.prompt_logprobs or [], req.logprobs, 0,
                                     self._decode_token)
        return joined(prompt, generated)

    def _fill_in_the_middle(self, prompt: str | list[int], suffix: str) -> str:
        """The prompt for the text between `prompt` and `suffix`, in Qwen2.5-Coder's format."""
        tok = self.tokenizer
        if not isinstance(prompt, str):
            raise APIError.bad_request("suffix: needs text prompts, not token ids", "suffix")
        if any(tok.token_to_id(t) is None for t in FIM_TOKENS):
            raise APIError.bad_request(f"suffix: this model has no fill-in-the-middle tokens ({', '.join(FIM_TOKENS)})",
                                       "suffix")
        prefix_token, suffix_token, middle_token = FIM_TOKENS
        return f"{prefix_token}{prompt}{suffix_token}{suffix}{middle_token}"

    async def _prompt(self, p: str | list[int], i: int, count: int, echo: bool) -> _Prompt:
        param = "prompt" if count == 1 else f"prompt.{i}"
        if isinstance(p, str):
            if not p:
                raise APIError.bad_request(f"{param}: must not be empty", "prompt")
            # As vLLM: a raw prompt gets the tokenizer's own special tokens (Llama's BOS; Qwen's add none).
            return _Prompt(await self.encode(p, param, add_special_tokens=True), p)
        if not p:
            raise APIError.bad_request(f"{param}: must not be empty", "prompt")
        self.check_token_ids(p, "prompt")
        return _Prompt(p, self.tokenizer.decode(p) if echo else "")

    async def _collect(self, first: tuple[int, RequestOutput],
                       rest: AsyncIterator[tuple[int, RequestOutput]]) -> dict[int, tuple[RequestOutput, dict[int, CompletionOutput]]]:
        finals: dict[int, tuple[RequestOutput, dict[int, CompletionOutput]]] = {}

        def take(i: int, out: RequestOutput) -> None:
            _, samples = finals.setdefault(i, (out, {}))
            finals[i] = (out, samples)
            for o in out.outputs:
                samples[o.index] = o

        take(*first)
        async for i, out in rest:
            take(i, out)
        return finals

    def _response(self, req: CompletionRequest, model: str, request_id: str, prompts: list[_Prompt],
                  finals: dict[int, tuple[RequestOutput, dict[int, CompletionOutput]]]) -> CompletionResponse:
        choices = []
        prompt_tokens = completion_tokens = cached = 0
        for i in sorted(finals):
            out, samples = finals[i]
            prompt_tokens += len(out.prompt_token_ids)
            cached += out.metrics.num_cached_tokens
            prefix = prompts[i].text if req.echo else ""
            prompt_lps = prompt_logprobs_field(out.prompt_logprobs or []) if req.prompt_logprobs is not None else None
            for j in sorted(samples):
                o = samples[j]
                completion_tokens += len(o.token_ids)
                choices.append(CompletionChoice(
                    index=i * req.n + j, text=prefix + o.text, finish_reason=o.finish_reason,
                    stop_reason=o.stop_reason,
                    logprobs=self._logprobs(req, out, o.token_ids, o.logprobs, len(prefix), req.echo),
                    prompt_logprobs=prompt_lps,
                ))
        usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens,
                          prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)

    async def _stream(self, req: CompletionRequest, model: str, request_id: str, prompts: list[_Prompt],
                      first: tuple[int, RequestOutput], rest: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}
        offsets: dict[int, int] = {}  # choice index -> characters sent so far (for text_offset)
        echoed: set[int] = set()
        finished: set[int] = set()
        token_counts: dict[int, int] = {}
        prompt_tokens: dict[int, int] = {}
        cached: dict[int, int] = {}

        def chunk(choice: CompletionChoice) -> str:
            return sse(CompletionResponse(id=request_id, created=created, model=model, choices=[choice]),
                       exclude=exclude)

        item: tuple[int, RequestOutput] | None = first
        try:
            while item is not None:
                i, out = item
                prompt_tokens[i] = len(out.prompt_token_ids)
                cached[i] = out.metrics.num_cached_tokens
                for o in out.outputs:
                    index = i * req.n + o.index
                    token_counts[index] = len(o.token_ids)
                    # The prompt is echoed with the choice's first output, which brings its logprobs.
                    echo = req.echo and index not in echoed
                    prefix = prompts[i].text if echo else ""
                    start = offsets.get(index, 0) + len(prefix)
                    logprobs = (self._logprobs(req, out, o.delta_token_ids, o.delta_logprobs, start, echo)
                                if o.delta_token_ids or echo else None)
                    done = o.finish_reason is not None and index not in finished
                    if echo or o.delta_text or logprobs is not None or done:
                        echoed.add(index)
                        offsets[index] = start + len(o.delta_text)
                        yield chunk(CompletionChoice(index=index, text=prefix + o.delta_text, logprobs=logprobs,
                                                     finish_reason=o.finish_reason if done else None,
                                                     stop_reason=o.stop_reason if done else None))
                    if done:
                        finished.add(index)
                item = await anext(rest, None)
        except APIError as err:
            yield sse_error(err)
            yield SSE_DONE
            return
        finally:
            await rest.aclose()  # type: ignore[attr-defined]
        if include_usage:
            p, c = sum(prompt_tokens.values()), sum(token_counts.values())
            usage: Any = UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                                   prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached.values())))
            yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage))
        yield SSE_DONE
