"""Render one untrusted chat template; run as a script by chat_template.render_request_template.

Reads `{"template", "variables", "max_output_bytes", "max_memory_bytes"}` as JSON on stdin and
writes `{"text": ...}` on stdout. Limits its own address space and CPU time first, renders in
jinja2's immutable sandbox (no attribute access to internals, no mutating methods, ranges
bounded) with the helpers chat templates expect (tojson, raise_exception, strftime_now,
loop controls), and stops as soon as the output passes its bound. Any failure: one line on
stderr and a non-zero exit. Imports nothing from fitserve (it runs as a plain script).
"""

from __future__ import annotations

import json
import resource
import sys
from datetime import datetime
from typing import Any, NoReturn

CPU_LIMIT_S = 10  # a backstop only: the parent kills the child at its own, shorter, deadline
EXIT_TEMPLATE_ERROR = 2
EXIT_OUTPUT_TOO_LARGE = 3


def _fail(message: str, code: int = EXIT_TEMPLATE_ERROR) -> NoReturn:
    sys.stderr.write(message.replace("\n", " ") + "\n")
    sys.exit(code)


def _limit(max_memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (max_memory_bytes, max_memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT_S, CPU_LIMIT_S))


def _environment() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> NoReturn:
        _fail(f"the template raised: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    max_output_bytes = int(request["max_output_bytes"])
    _limit(int(request["max_memory_bytes"]))
    try:
        template = _environment().from_string(request["template"])
        pieces, num_bytes = [], 0
        for piece in template.generate(**request["variables"]):
            num_bytes += len(piece.encode("utf-8", "surrogatepass"))
            if num_bytes > max_output_bytes:
                _fail(f"its output passed {max_output_bytes} bytes", EXIT_OUTPUT_TOO_LARGE)
            pieces.append(piece)
    except MemoryError:
        _fail("it ran out of its memory bound")
    except Exception as exc:  # noqa: BLE001 - jinja2 syntax, undefined and security errors: told to the client
        _fail(f"{type(exc).__name__}: {exc}")
    sys.stdout.write(json.dumps({"text": "".join(pieces)}))


if __name__ == "__main__":
    main()
