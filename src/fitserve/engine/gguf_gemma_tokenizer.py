"""The tokenizer of a Gemma 3 GGUF file (`tokenizer.ggml.model == llama`: SentencePiece pieces and
scores, no merges), built by transformers' own GGUF converter, with Gemma's chat template when the
file carries none.

transformers rebuilds the BPE merges from the vocabulary (Gemma's scores do not follow the merge
order) and marks the control tokens (<start_of_turn>, <end_of_turn>) special: the same conversion
`from_pretrained(..., gguf_file=...)` does. It takes seconds and imports torch, so it runs once per
file: engine/tokenizer.py caches the result on disk.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

# Gemma 3's chat template (google/gemma-3-*-it tokenizer_config.json) for text: a system turn is put at the
# start of the first user turn, "assistant" is spelled "model"; image content is refused, since fitserve
# serves Gemma 3's text model only.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- else -%}{{ raise_exception('fitserve serves the text model of Gemma 3: image content is not supported') }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def gemma_gguf_tokenizer(path: str, chat_template: str | None) -> PreTrainedTokenizerFast:
    """The file's tokenizer, with `chat_template` (the file's) or else GEMMA_CHAT_TEMPLATE."""
    return converted_gguf_tokenizer(path, chat_template or GEMMA_CHAT_TEMPLATE)


def converted_gguf_tokenizer(path: str, chat_template: str | None) -> PreTrainedTokenizerFast:
    """A GGUF file's tokenizer as transformers' converter builds it for its architecture (Gemma 3's
    SentencePiece; Qwen2/Qwen3's byte-level BPE with Qwen's pre-tokenizer, which splits digits one by
    one, unlike GPT-2's), with `chat_template`."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(path)
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    tokenizer_config = {k: v for k, v in tokenizer_config.items() if k != "chat_template"}
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template, **tokenizer_config)
