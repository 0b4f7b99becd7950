"""What a request may do to the chat template: set variables, and (only when the operator allows
it) bring its own template, rendered in a sandboxed child process with a deadline and bounds.

`chat_template_kwargs` (vLLM's extra field) reaches the template as variables, such as
`enable_thinking`. A key that is also an argument of transformers' `apply_chat_template`
(`messages`, `tokenize`, `chat_template`, ...) would change how the conversation is rendered or
returned instead: it is refused with 400. A request's own template (`chat_template`, only with
`--trust-request-chat-template`) replaces the model's, and with it the operator's system prompt
handling, so it is rendered by `template_sandbox.py` in a child process: a sandboxed jinja2
environment, output bounded, memory bounded, killed past its deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from fitserve.engine.errors import InvalidRequestError

REQUEST_TEMPLATE_KEY = "chat_template"
TRUST_FLAG = "--trust-request-chat-template"
PARAM = "chat_template_kwargs"
# transformers' apply_chat_template's own arguments (and the variables it sets itself): a template
# variable by one of these names would change the call, not what the template sees.
RESERVED_TEMPLATE_ARGS = frozenset({
    "conversation", "conversations", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})
SANDBOX_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "template_sandbox.py")


@dataclass(frozen=True, slots=True)
class TemplateLimits:
    """Bounds on rendering a request's own template (each render is a fresh child process)."""

    timeout_s: float = 3.0  # start-up of the child (~0.1 s) included: a nested loop is cut here
    max_output_bytes: int = 4 * 2**20  # ~1M tokens of prompt: more than any model's context
    max_memory_bytes: int = 1 * 2**30  # the child's address space: a template building huge strings dies


DEFAULT_TEMPLATE_LIMITS = TemplateLimits()


def template_variables(kwargs: dict[str, Any] | None, *, allow_template: bool) -> tuple[dict[str, Any], str | None]:
    """`chat_template_kwargs` split into the template's variables and a request template (or None).

    InvalidRequestError (400) for a reserved key, or for a template when `allow_template` is False."""
    variables = dict(kwargs or {})
    template = variables.pop(REQUEST_TEMPLATE_KEY, None)
    if template is not None and not allow_template:
        raise InvalidRequestError(
            f"A request may not replace the chat template ({PARAM}.{REQUEST_TEMPLATE_KEY}) unless the server "
            f"runs with {TRUST_FLAG}.", param=PARAM)
    if template is not None and not isinstance(template, str):
        raise InvalidRequestError(f"{PARAM}.{REQUEST_TEMPLATE_KEY} must be a string.", param=PARAM)
    reserved = sorted(key for key in variables if key in RESERVED_TEMPLATE_ARGS)
    if reserved:
        raise InvalidRequestError(
            f"{PARAM} may set template variables only; {', '.join(reserved)} "
            f"{'is an argument' if len(reserved) == 1 else 'are arguments'} of the template call (use the "
            "request's own fields, such as messages, tools and add_generation_prompt).", param=PARAM)
    return variables, template


def render_request_template(template: str, variables: dict[str, Any],
                            limits: TemplateLimits = DEFAULT_TEMPLATE_LIMITS) -> str:
    """Render a request's own template in the sandbox child; InvalidRequestError when it fails,
    runs past `limits.timeout_s`, or grows past the output or memory bound."""
    payload = json.dumps({"template": template, "variables": variables, "max_output_bytes": limits.max_output_bytes,
                          "max_memory_bytes": limits.max_memory_bytes}, default=str)
    try:
        # -s -E: no user site-packages or PYTHON* variables; the script imports jinja2 only.
        done = subprocess.run([sys.executable, "-s", "-E", SANDBOX_SCRIPT], input=payload.encode(),
                              capture_output=True, timeout=limits.timeout_s, check=False)
    except subprocess.TimeoutExpired:  # run() has killed the child
        raise InvalidRequestError(f"The request's chat template did not render within {limits.timeout_s:g} s.",
                                  param=PARAM) from None
    if done.returncode != 0:
        reason = done.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = reason[-1][:300] if reason else f"exit code {done.returncode}"
        if done.returncode < 0 or not reason:
            detail = "it ran out of its memory or time bounds"
        raise InvalidRequestError(f"The request's chat template cannot render these messages: {detail}",
                                  param=PARAM)
    return json.loads(done.stdout)["text"]
