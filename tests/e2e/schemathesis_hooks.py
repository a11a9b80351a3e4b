"""A check for `schemathesis run` (SCHEMATHESIS_HOOKS=schemathesis_hooks): a schema-valid
request may get a 400 for two rules only, which no JSON schema can state: the context limit
(it depends on how the prompt tokenizes) and min_tokens <= max_tokens (a comparison of two
fields; the schema says it in words). Any other 400 for valid data fails."""

import schemathesis

ALLOWED = ("context", "min_tokens must be <= max_tokens")


@schemathesis.check
def valid_data_is_rejected_only_for_the_context_length(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    message = response.json()["error"]["message"]
    if not any(reason in message for reason in ALLOWED):
        raise AssertionError(f"schema-valid request rejected for something the schema does not say: {message}")
    return None
