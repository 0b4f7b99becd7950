"""Streaming a tool call's arguments while the model writes them (hermes, mistral).

A call object `{"name": "f", "arguments": {...}}` can be sent once its name is whole: the first
delta carries the call's id, type and name, later ones the arguments text as it grows. The
fragments must add up to the `arguments` string a whole reply gives, `json.dumps` of the parsed
object, whatever spacing or escapes the model wrote; so the raw text is rewritten as it arrives
into json.dumps' own spelling (`canonical_json_prefix`), and only what can no longer change is
sent: a number or `true` waits for the character after it, an escape until it is whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# A call whose arguments can stream: the name first, then `arguments` (or `parameters`) opening an object.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_SCALAR_CHARS = frozenset("+-0123456789.eEtrufalsn")  # numbers, true, false, null
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
UNICODE_ESCAPE_CHARS = 6  # \uXXXX


@dataclass(frozen=True, slots=True)
class CallHead:
    """The streamable start of a call object: its function name, and where its arguments object begins."""

    name: str
    arguments_at: int  # index of the arguments' `{` in the call object's text


def call_head(text: str) -> CallHead | None:
    """`text` (a call object, perhaps cut short) as far as its name and the arguments' opening brace;
    None until both are there, or when the object is written in another order (it is then sent whole)."""
    match = _CALL_HEAD.match(text)
    if match is None:
        return None
    try:
        name = json.loads(match.group(1))
    except json.JSONDecodeError:
        return None
    return CallHead(name, match.end())


@dataclass(frozen=True, slots=True)
class CanonicalPrefix:
    text: str  # json.dumps' spelling of the value's settled part
    closed: bool  # the value ended (its closing bracket was read)


def canonical_json_prefix(raw: str) -> CanonicalPrefix | None:
    """The settled part of the JSON value that `raw` begins with, spelled as json.dumps spells the parsed
    value (', ' and ': ' separators, ASCII escapes, numbers re-read); None when `raw` is not JSON."""
    stream = CanonicalJsonStream()
    delta = stream.feed(raw)
    return None if delta is None else CanonicalPrefix(delta, stream.closed)


class CanonicalJsonStream:
    """canonical_json_prefix for a text that grows at its end, read once: each `feed` resumes where
    the last stopped (inside a string too) and returns only the newly settled text, so a call whose
    arguments run to thousands of tokens costs each token its own characters, not the whole text again.
    """

    def __init__(self, start: int = 0) -> None:
        self.position = start  # where reading resumes in the text
        self.depth = 0
        self.in_string = False  # the position lies inside a string, after its opening quote
        self.closed = False  # the value ended
        self.invalid = False
        self.scalar_end = 0  # how far the number or literal at `position` was read (it waits for its end)

    def feed(self, raw: str) -> str | None:
        """The settled text added since the last feed ('' when none); None once `raw` is not JSON.
        `raw` is the whole text so far: the last feed's text with more at its end."""
        if self.invalid:
            return None
        out: list[str] = []
        i = self.position
        while i < len(raw) and not self.closed:
            if self.in_string:
                end = _string_rest(raw, i, out)
                if end is None:
                    self.invalid = True
                    return None
                if end < 0:  # the string goes on past the text read so far
                    i = -end - 1
                    break
                i, self.in_string = end, False
                continue
            char = raw[i]
            if char == '"':
                out.append('"')
                i, self.in_string = i + 1, True
                continue
            if char in _SCALAR_CHARS:
                end = max(i, self.scalar_end)
                while end < len(raw) and raw[end] in _SCALAR_CHARS:
                    end += 1
                if end == len(raw):  # `1` may become `12`, `tr` `true`: wait for what follows
                    self.scalar_end = end
                    break
                try:
                    out.append(json.dumps(json.loads(raw[i:end])))
                except json.JSONDecodeError:
                    self.invalid = True
                    return None
                i = end
                continue
            if char in "{[":
                self.depth += 1
                out.append(char)
            elif char in "}]":
                self.depth -= 1
                out.append(char)
                self.closed = self.depth == 0
            elif char == ",":
                out.append(", ")
            elif char == ":":
                out.append(": ")
            elif not char.isspace():
                self.invalid = True
                return None
            i += 1
        self.position = i
        return "".join(out)


def _string_rest(raw: str, start: int, out: list[str]) -> int | None:
    """Append the string's characters from raw[start] (inside it) to `out` in json.dumps' escapes; the
    index after its closing quote; -(i + 1) when the text ends inside it at i (what was whole is
    appended; i is where to resume: an escape cut short is read again whole); None when invalid."""
    i = start
    while i < len(raw):
        char = raw[i]
        if char == '"':
            out.append('"')
            return i + 1
        if char != "\\":
            out.append(json.dumps(char)[1:-1])
            i += 1
            continue
        if i + 1 >= len(raw):
            return -(i + 1)
        kind = raw[i + 1]
        if kind == "u":
            digits = raw[i + 2:i + UNICODE_ESCAPE_CHARS]
            if len(digits) < 4:
                return -(i + 1) if all(d in _HEX_DIGITS for d in digits) else None
            if not all(d in _HEX_DIGITS for d in digits):
                return None
            code = int(digits, 16)
            # a surrogate half stays an escape, as json.dumps writes a pair back; any other character is re-escaped
            out.append(f"\\u{code:04x}" if 0xD800 <= code <= 0xDFFF else json.dumps(chr(code))[1:-1])
            i += UNICODE_ESCAPE_CHARS
            continue
        if kind not in _ESCAPES:
            return None
        out.append(json.dumps(_ESCAPES[kind])[1:-1])
        i += 2
    return -(i + 1)
