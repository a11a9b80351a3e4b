"""A check for `schemathesis run` (SCHEMATHESIS_HOOKS=schemathesis_hooks): a schema-valid
request may get a 400 only for rules no JSON schema can state, each said in words in the
schema: the context limit (it depends on how the prompt tokenizes), min_tokens <= max_tokens
(a comparison of two fields), one output constraint at a time and a tool_choice that fits the
tools (comparisons of fields), and a schema, regex or grammar the grammar engine must compile.
Any other 400 for valid data fails."""

import schemathesis

ALLOWED = ("context", "min_tokens must be <= max_tokens", "structured_outputs", "response_format", "tool_choice")


@schemathesis.check
def valid_data_is_rejected_only_for_the_context_length(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    message = response.json()["error"]["message"]
    if not any(reason in message for reason in ALLOWED):
        raise AssertionError(f"schema-valid request rejected for something the schema does not say: {message}")
    return None
