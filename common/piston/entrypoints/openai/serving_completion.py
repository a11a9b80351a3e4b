"""POST /v1/completions: one engine request per prompt, plain or streamed."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from piston.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from piston.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    bad_request,
    collect_until_disconnected,
    iterate_in_task,
    merge_async_iterators,
    sse,
    to_openai_error,
    usage_of,
)
from piston.outputs import CompletionOutput, PositionLogprobs, RequestOutput


def as_prompt_list(prompt) -> list[str | list[int]]:
    """OpenAI's four prompt shapes as a list of prompts (a string or token ids each)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ValueError("prompt is empty; give a string, a list of strings or token ids.")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


def stop_hold_back(params) -> int:
    """Characters of an unfinished text that may still turn out to be a stop string."""
    if params.stop and not params.include_stop_str_in_output:
        return max(len(s) for s in params.stop) - 1
    return 0


@dataclass
class _StreamState:
    sent_chars: int = 0
    sent_tokens: int = 0
    text_offset: int = 0
    started: bool = False
    done: bool = False


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request):
        """Serve one /v1/completions request; raises OpenAIError for a bad request."""
        try:
            prompts = as_prompt_list(request.prompt)
        except (ValueError, TypeError) as e:
            raise bad_request(e) from e
        lora_request = self.check_request(request, raw_request, len(prompts))
        model_name = self.response_model_name(lora_request)
        try:
            params = request.to_sampling_params()
        except (ValueError, TypeError) as e:
            raise bad_request(e) from e
        processed = await self.validate_prompts(prompts, params)
        request_id = self.request_id("cmpl", raw_request)
        created = int(time.time())
        prompt_texts = [text if text is not None else (await self.engine.decode(ids) if request.echo else "")
                        for text, ids, _ in processed]
        gens = [self.generate(ids, p, f"{request_id}-{i}", request, raw_request, lora_request)
                for i, (_, ids, p) in enumerate(processed)]
        if request.stream:
            return StreamingResponse(
                self._stream(gens, request, request_id, created, prompt_texts, params, model_name),
                media_type="text/event-stream")

        async def collect() -> list[RequestOutput]:
            finals: list[RequestOutput | None] = [None] * len(gens)
            async for i, out in merge_async_iterators(*gens):
                finals[i] = out
                self.observe(out)
            return finals

        finals = await collect_until_disconnected(collect, raw_request)
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                text, logprobs = c.text, None
                if request.echo:
                    text = prompt_texts[i] + text
                if request.logprobs is not None:
                    logprobs, _ = self._logprobs(out, c, request.echo, 0, len(c.token_ids))
                choices.append(CompletionChoice(
                    index=i * params.n + c.index, text=text, logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return CompletionResponse(id=request_id, created=created, model=model_name,
                                  choices=choices, usage=usage_of(finals))

    async def _stream(self, gens, request: CompletionRequest, request_id: str, created: int,
                      prompt_texts: list[str], params, model_name: str):
        hold = stop_hold_back(params)
        states: dict[int, _StreamState] = {}
        finals: list[RequestOutput | None] = [None] * len(gens)
        merged = iterate_in_task(merge_async_iterators(*gens))
        first_chunk_times: dict[int, float] = {}
        try:
            async for i, out in merged:
                finals[i] = out
                for c in out.outputs:
                    index = i * params.n + c.index
                    stream = states.setdefault(index, _StreamState())
                    if stream.done:
                        continue
                    finished = c.finish_reason is not None
                    end = len(c.text) if finished else max(len(c.text) - hold, stream.sent_chars)
                    delta = c.text[stream.sent_chars:end]
                    num_tokens = len(c.token_ids)
                    if not delta and num_tokens == stream.sent_tokens and not finished \
                            and (stream.started or not request.echo):
                        continue
                    prefix = prompt_texts[i] if request.echo and not stream.started else ""
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs, stream.text_offset = self._logprobs(
                            out, c, prefix != "", stream.sent_tokens, num_tokens, stream.text_offset)
                    stream.started, stream.done = True, finished
                    stream.sent_chars, stream.sent_tokens = end, num_tokens
                    data = sse(CompletionResponse(
                        id=request_id, created=created, model=model_name,
                        choices=[CompletionChoice(
                            index=index, text=prefix + delta, logprobs=logprobs,
                            finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason)]).model_dump(exclude={"usage"}))
                    # Stamped as the chunk goes to the HTTP server: the client may read it
                    # before this generator is resumed after the write.
                    first_chunk_times.setdefault(i, time.monotonic())
                    yield data
                self.observe(out, first_chunk_times.get(i))
            if request.include_usage:
                yield sse(CompletionResponse(id=request_id, created=created,
                                             model=model_name, choices=[],
                                             usage=usage_of(finals)))
        except Exception as e:  # the engine died or a request failed mid-stream
            yield sse(to_openai_error(e).to_response())
        finally:
            await merged.aclose()
        yield SSE_DONE

    def _logprobs(self, out: RequestOutput, c: CompletionOutput, with_prompt: bool,
                  start: int, end: int, text_offset: int = 0
                  ) -> tuple[CompletionLogprobs, int]:
        """OpenAI completion logprobs for generated positions [start, end), preceded by
        the prompt's positions when ``with_prompt``; returns them and the next offset."""
        lp = CompletionLogprobs()
        rows: list[tuple[int, PositionLogprobs | None]] = []
        if with_prompt and out.prompt_logprobs is not None:
            rows += list(zip(out.prompt_token_ids, out.prompt_logprobs))
        rows += list(zip(c.token_ids[start:end], (c.logprobs or [])[start:end]))
        for token_id, position in rows:
            chosen = position.get(token_id) if position else None
            token = chosen.decoded_token if chosen and chosen.decoded_token is not None \
                else self.tokenizer.decode([token_id])
            lp.tokens.append(token)
            lp.token_logprobs.append(chosen.logprob if chosen else None)
            lp.top_logprobs.append(None if position is None else {
                (p.decoded_token if p.decoded_token is not None else self.tokenizer.decode([t])):
                    p.logprob
                for t, p in sorted(position.items(), key=lambda kv: -kv[1].logprob)})
            lp.text_offset.append(text_offset)
            text_offset += len(token)
        return lp, text_offset
