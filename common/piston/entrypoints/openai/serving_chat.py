"""POST /v1/chat/completions: the model's chat template, then one engine request."""

from __future__ import annotations

import json
import time

from fastapi import Request
from fastapi.responses import StreamingResponse

from piston.entrypoints.openai.protocol import (ChatChoice, ChatCompletionChunk,
                                                ChatCompletionRequest, ChatCompletionResponse,
                                                ChatLogprobs, ChatStreamChoice, DeltaMessage,
                                                OpenAIError, ResponseMessage, TokenLogprob, ToolCall,
                                                TopLogprob)
from piston.entrypoints.openai.serving_completion import stop_hold_back
from piston.entrypoints.openai.tool_calls import ToolCallStream, tool_constraint, tools_in_play
from piston.entrypoints.openai.serving_engine import (SSE_DONE, OpenAIServing, bad_request,
                                                      collect_until_disconnected,
                                                      iterate_in_task, sse, to_openai_error,
                                                      usage_of)
from piston.outputs import CompletionOutput, Logprob, RequestOutput


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


class OpenAIServingChat(OpenAIServing):
    def conversation(self, request: ChatCompletionRequest) -> list[dict]:
        """The messages as the chat template takes them (400 if the model has no template)."""
        if not (self.config.chat_template or getattr(self.tokenizer, "chat_template", None)):
            raise OpenAIError("This model's tokenizer has no chat template; use /v1/completions.",
                              param="messages")
        conversation = []
        for m in request.messages:
            content = m.content
            if isinstance(content, list):
                content = "\n".join(part.text for part in content)
            message = {"role": m.role, "content": content or ""}
            if m.name:
                message["name"] = m.name
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                # Templates read the arguments as an object, as transformers documents.
                message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
            conversation.append(message)
        return conversation

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request):
        """Serve one /v1/chat/completions request; raises OpenAIError for a bad request."""
        lora_request = self.check_request(request, raw_request)
        model_name = self.response_model_name(lora_request)
        try:
            constraint = tool_constraint(request)
            params = request.to_sampling_params(constraint)
        except (ValueError, TypeError) as e:
            raise bad_request(e) from e
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if tools_in_play(request) else None
        try:
            token_ids = await self.engine.tokenize_chat(self.conversation(request), request.add_generation_prompt,
                                                        tools, self.config.chat_template)
        except OpenAIError:
            raise
        except Exception as e:  # jinja raises for conversations the template rejects
            raise OpenAIError(f"The chat template rejected the messages: {e}", param="messages") from e
        [(_, token_ids, params)] = await self.validate_prompts([token_ids], params)
        request_id = self.request_id("chatcmpl", raw_request)
        created = int(time.time())
        gen = self.generate(token_ids, params, request_id, request, raw_request, lora_request)
        if request.stream:
            return StreamingResponse(self._stream(gen, request, request_id, created, params, constraint, model_name),
                                     media_type="text/event-stream")

        async def collect() -> RequestOutput:
            final = None
            try:
                async for out in gen:
                    final = out
            finally:
                await gen.aclose()
            self.observe(final)
            return final

        final = await collect_until_disconnected(collect, raw_request)
        choices = []
        for c in final.outputs:
            content, calls, finish = self._tool_calls(request, constraint, c)
            choices.append(ChatChoice(
                index=c.index, message=ResponseMessage(content=content, tool_calls=calls or None),
                logprobs=self._logprobs(c, 0, len(c.token_ids), params.logprobs) if request.logprobs
                else None, finish_reason=finish, stop_reason=c.stop_reason))
        return ChatCompletionResponse(id=request_id, created=created,
                                      model=model_name, choices=choices,
                                      usage=usage_of([final]))

    async def _stream(self, gen, request: ChatCompletionRequest, request_id: str, created: int,
                      params, constraint=None, model_name: str | None = None):
        hold = stop_hold_back(params)
        sent_chars = [0] * params.n
        sent_tokens = [0] * params.n
        done = [False] * params.n
        tool_streams = [ToolCallStream(request, constraint is not None, self.config.tool_call_parser)
                        for _ in range(params.n)] if tools_in_play(request) else None
        final = None
        source = iterate_in_task(gen)

        def chunk(choices, usage=None) -> str:
            payload = ChatCompletionChunk(id=request_id, created=created,
                                          model=model_name or self.served_model_name, choices=choices,
                                          usage=usage)
            return sse(payload.model_dump(exclude=None if usage else {"usage"}))

        try:
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                         for i in range(params.n)])
            first_chunk_time = None
            async for out in source:
                final = out
                for c in out.outputs:
                    i = c.index
                    if done[i]:
                        continue
                    finished = c.finish_reason is not None
                    end = len(c.text) if finished else max(len(c.text) - hold, sent_chars[i])
                    delta = c.text[sent_chars[i]:end]
                    if not delta and len(c.token_ids) == sent_tokens[i] and not finished:
                        continue
                    logprobs = self._logprobs(c, sent_tokens[i], len(c.token_ids),
                                              params.logprobs) if request.logprobs else None
                    sent_chars[i], sent_tokens[i], done[i] = end, len(c.token_ids), finished
                    message, finish = DeltaMessage(content=delta), c.finish_reason
                    if tool_streams is not None:
                        calls = tool_streams[i]
                        content, deltas = calls.update(c.text[:end], finished)
                        message = DeltaMessage(content=content, tool_calls=deltas or None)
                        finish = calls.finish_reason(c.finish_reason)
                    data = chunk([ChatStreamChoice(index=i, delta=message, logprobs=logprobs, finish_reason=finish)])
                    # Stamped as the chunk goes to the HTTP server: the client may read it
                    # before this generator is resumed after the write.
                    first_chunk_time = first_chunk_time or time.monotonic()
                    yield data
                self.observe(out, first_chunk_time)
            if request.include_usage and final is not None:
                yield chunk([], usage_of([final]))
        except Exception as e:  # the engine died or the request failed mid-stream
            yield sse(to_openai_error(e).to_response())
        finally:
            await source.aclose()
        yield SSE_DONE

    def _tool_calls(self, request: ChatCompletionRequest, constraint, c: CompletionOutput
                    ) -> tuple[str | None, list[ToolCall], str | None]:
        """(content, tool calls, finish_reason) of one finished choice."""
        if not tools_in_play(request) or c.finish_reason not in ("stop", "length"):
            return c.text, [], c.finish_reason
        return ToolCallStream(request, constraint is not None, self.config.tool_call_parser).final(
            c.text, c.finish_reason)

    def _logprobs(self, c: CompletionOutput, start: int, end: int, top_k: int | None
                  ) -> ChatLogprobs:
        """OpenAI chat logprobs for generated positions [start, end)."""
        content = []
        for token_id, position in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
            chosen = position.get(token_id)
            token = self._text(token_id, chosen)
            top = sorted(position.items(), key=lambda kv: -kv[1].logprob)[:top_k or 0]
            content.append(TokenLogprob(
                token=token, logprob=chosen.logprob if chosen else float("-inf"),
                bytes=_token_bytes(token),
                top_logprobs=[TopLogprob(token=self._text(t, p), logprob=p.logprob,
                                         bytes=_token_bytes(self._text(t, p))) for t, p in top]))
        return ChatLogprobs(content=content)

    def _text(self, token_id: int, lp: Logprob | None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id])


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text
