"""Chat templates: a model's Jinja template, rendered as transformers renders it.

The same sandboxed environment (trim_blocks, lstrip_blocks, loop controls), the same
helpers (``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML)
and the same variables (``messages``, ``tools``, ``documents``, ``add_generation_prompt``,
the special tokens), so a template written for transformers gives the same text here
without importing transformers (which costs seconds, and torch with it).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training
        masks; rendering only needs its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                tools: list[dict] | None = None, documents: list[dict] | None = None,
                special_tokens: dict[str, str | None] | None = None, **kwargs: Any) -> str:
    """The conversation as prompt text. Raises jinja2's TemplateError when the template
    rejects it (e.g. roles that do not alternate)."""
    return _compile(template).render(messages=messages, tools=tools, documents=documents,
                                     add_generation_prompt=add_generation_prompt,
                                     **(special_tokens or {}), **kwargs)
