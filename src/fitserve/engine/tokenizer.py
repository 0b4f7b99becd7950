"""Tokenizer: a transformers fast tokenizer plus the chat template, built from a ModelSource (torch-free).

GGUF files carry their vocabulary, merges and chat template in metadata. Building the tokenizer
from them costs seconds, so the result is saved once under the cache folder
(`~/.cache/fitserve/tokenizers/<key of path, size, mtime>`) and later starts load it in ~0.1 s.
A dummy model with no tokenizer files gets a byte-level fallback (see `_fallback_tokenizer`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RawTokenizer
from transformers import PreTrainedTokenizerFast  # unlike AutoTokenizer, this does not import torch

from fitserve.config import ConfigError
from fitserve.engine.chat_template import render_request_template, template_variables
from fitserve.engine.errors import InvalidRequestError
from fitserve.weights.source import ModelSource

DEFAULT_CACHE_DIR = Path("~/.cache/fitserve/tokenizers")
GGUF_TOKEN_TYPE_CONTROL = 3  # gguf's TokenType.CONTROL: special tokens such as <|im_start|>
GGUF_CACHE_VERSION = "2"  # bump when the conversion changes, to invalidate cached tokenizers
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class Tokenizer:
    def __init__(self, hf: PreTrainedTokenizerFast, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.hf = hf  # the raw fast tokenizer; hf.backend_tokenizer is the `tokenizers` object
        own_eos = () if hf.eos_token_id is None else (hf.eos_token_id,)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(own_eos + tuple(eos_token_ids)))

    @classmethod
    def from_source(cls, source: ModelSource, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
        if source.tokenizer_kind == "gguf":
            hf = _gguf_tokenizer_cached(source.tokenizer_path, Path(cache_dir or DEFAULT_CACHE_DIR).expanduser())
        elif source.tokenizer_kind == "hf":
            hf = PreTrainedTokenizerFast.from_pretrained(source.tokenizer_path)
        else:
            hf = _fallback_tokenizer(source.arch.vocab_size, source.eos_token_ids)
        if source.chat_template is not None:  # --chat-template
            hf.chat_template = source.chat_template
        return cls(hf, source.eos_token_ids)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can produce, added tokens included (may be below the model's vocab)."""
        return len(self.hf)

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.hf.all_special_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(ids)

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    def token_bytes(self, token_id: int) -> list[int]:
        """One token's raw bytes: a byte-level BPE piece (or a `<0xNN>` byte-fallback piece) may
        be part of a UTF-8 character that its decoded text shows as a replacement character."""
        piece = self.hf.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(c in _BYTE_LEVEL_CHARS for c in piece):
            return [_byte_of(c) for c in piece]
        if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return [int(piece[3:5], 16)]
        return list(self.decode([token_id], skip_special_tokens=False).encode("utf-8"))

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, *,
                    request_template: str | None = None, continue_final_message: bool = False, **kwargs: Any) -> str:
        """The prompt text of a conversation; InvalidRequestError when the template rejects it.

        `kwargs` are template variables (and `tools`); `request_template`, a request's own template,
        is rendered in the sandbox child (engine/chat_template.py), never in this process.
        `continue_final_message`: the text ends where the final message's content does (transformers
        finds it in the rendering), so the model continues that message instead of starting a new one."""
        tools = kwargs.pop("tools", None)
        variables, _ = template_variables(kwargs, allow_template=False)  # 400 for `messages`, `tokenize`...
        if continue_final_message and request_template is not None:
            raise InvalidRequestError("`continue_final_message` is not supported with a request's own chat template.",
                                      param="continue_final_message")
        if request_template is not None:
            return render_request_template(request_template, {
                **self._special_tokens(), **variables, "messages": messages, "tools": tools,
                "add_generation_prompt": add_generation_prompt})
        if not self.hf.chat_template:
            raise InvalidRequestError("This model has no chat template; use /v1/completions with a plain prompt.",
                                      param="messages")
        try:
            return self.hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                               add_generation_prompt=add_generation_prompt,
                                               continue_final_message=continue_final_message, **variables)
        except Exception as exc:  # jinja2 errors, raise_exception() in templates, bad message shapes
            raise InvalidRequestError(f"The chat template cannot render these messages: {exc}",
                                      param="messages") from None

    def _special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, ...: the variables transformers gives a template besides the messages."""
        return {key: value for key, value in self.hf.special_tokens_map.items() if isinstance(value, str)}

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> list[int]:
        # The template writes any BOS itself; encoding must not add another.
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs), add_special_tokens=False)


def _gguf_cache_key(path: str) -> str:
    stat = os.stat(path)
    text = f"{GGUF_CACHE_VERSION}|{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _gguf_tokenizer_cached(path: str | None, cache_root: Path) -> PreTrainedTokenizerFast:
    if path is None:
        raise ConfigError("GGUF tokenizer requested without a GGUF file.")
    folder = cache_root / _gguf_cache_key(path)
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    hf = gguf_tokenizer(path)
    tmp: str | None = None
    try:  # write to a temporary folder, then rename: a concurrent start never reads half a cache
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_root, prefix=".tmp-")
        hf.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:  # the cache is an optimisation: a read-only home still serves
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return hf


def gguf_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE (`tokenizer.ggml.model == gpt2`) from GGUF metadata, with its chat template;
    SentencePiece files (`llama`: Gemma, Mistral, Phi-3) and Qwen's as transformers' converter builds
    them (engine/gguf_gemma_tokenizer.py)."""
    from fitserve.weights.gguf_file import field_value, open_gguf
    reader = open_gguf(path)
    model_type = field_value(reader, "tokenizer.ggml.model")
    architecture = field_value(reader, "general.architecture")
    if model_type == "llama" and architecture in ("gemma2", "gemma3"):
        from fitserve.engine.gguf_gemma_tokenizer import gemma_gguf_tokenizer  # SentencePiece: Gemma 2/3
        return gemma_gguf_tokenizer(path, field_value(reader, "tokenizer.chat_template"))
    # SentencePiece (Mistral, Mixtral, Phi-3), and byte-level BPE whose pre-tokenizer regex is not GPT-2's
    # (Qwen's; Llama 3's `llama-bpe`, Mistral's `tekken`, ...): transformers' converter knows them
    if model_type == "llama" or architecture in ("qwen2", "qwen3", "qwen3moe") or _known_split(reader):
        from fitserve.engine.gguf_gemma_tokenizer import converted_gguf_tokenizer
        return converted_gguf_tokenizer(path, field_value(reader, "tokenizer.chat_template"))
    if model_type != "gpt2":
        raise ConfigError(f"GGUF tokenizer type {model_type!r} is not supported (only byte-level BPE, 'gpt2'); "
                          "pass --tokenizer with a Hugging Face tokenizer folder.")
    tokens: list[str] = field_value(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field_value(reader, "tokenizer.ggml.merges", [])]
    token_types = field_value(reader, "tokenizer.ggml.token_type", [])
    raw = RawTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    raw.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, kind in enumerate(token_types) if kind == GGUF_TOKEN_TYPE_CONTROL])

    def token(key: str) -> str | None:
        index = field_value(reader, f"tokenizer.ggml.{key}_token_id")
        return None if index is None else tokens[int(index)]
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"),
        pad_token=token("padding"), chat_template=field_value(reader, "tokenizer.chat_template"),
        add_bos_token=bool(field_value(reader, "tokenizer.ggml.add_bos_token", False)),
    )


def _known_split(reader: Any) -> bool:
    """Whether the file's `tokenizer.ggml.pre` names a pre-tokenizer regex transformers' converter applies
    (GPT-2's, which the direct build uses, would split digits and words otherwise)."""
    from fitserve.weights.gguf_file import field_value
    pre = field_value(reader, "tokenizer.ggml.pre")
    if pre is None:
        return False
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    return pre in GGUF_PRE_TOKENIZER_SPLITS


def _fallback_tokenizer(vocab_size: int, eos_token_ids: tuple[int, ...]) -> PreTrainedTokenizerFast:
    """For dummy models without tokenizer files (benchmarks): one token per UTF-8 byte (ids 0-255),
    placeholder tokens `<|id_N|>` up to vocab_size, the model's first eos id as EOS, a plain chat
    template. Its text is meaningless for real weights; it only keeps the request path working."""
    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_alphabet)}
    vocab.update({f"<|id_{i}|>": i for i in range(len(vocab), max(vocab_size, len(vocab) + 1))})
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    eos_id = eos_token_ids[0] if eos_token_ids and eos_token_ids[0] >= 256 else len(vocab) - 1
    eos = f"<|id_{eos_id}|>"
    raw.add_special_tokens([AddedToken(eos, special=True, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, chat_template=FALLBACK_CHAT_TEMPLATE)


_BYTE_LEVEL_CHARS = frozenset(pre_tokenizers.ByteLevel.alphabet())  # the 256 characters that spell bytes


def _byte_of(char: str) -> int:
    """The byte that GPT-2's byte-to-unicode table maps to `char`."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
