"""Write tests/data/llmcompressor_w4a16/: a tiny random Llama saved by transformers, quantized by
llm-compressor's GPTQModifier (scheme W4A16, 8 calibration samples of 64 random tokens, on the CPU)
and saved compressed. tests/test_int_quant_outside_tool.py serves it.

llm-compressor does not fit the project's environment (it pins transformers <= 5.17, torch <= 2.14,
compressed-tensors == 0.19.0), so this runs in a throwaway one:

    python -m venv /tmp/lc && /tmp/lc/bin/pip install llmcompressor==0.14.0.1
    /tmp/lc/bin/python tests/data/make_llmcompressor_w4a16.py tests/data/llmcompressor_w4a16
"""

import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

NUM_SAMPLES, SAMPLE_TOKENS = 8, 64


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """oneshot wants a processor with a dataset; the samples are token ids already."""
    raw = Tokenizer(models.BPE({s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, []))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw)


def main(out: str) -> None:
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = Path(tempfile.mkdtemp()) / "base"  # oneshot reads the model's config from a folder
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    samples = Dataset.from_list([{"input_ids": torch.randint(3, 320, (SAMPLE_TOKENS,), generator=generator).tolist(),
                                  "attention_mask": [1] * SAMPLE_TOKENS} for _ in range(NUM_SAMPLES)])
    oneshot(model=model, processor=byte_tokenizer(), dataset=samples,
            recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
            max_seq_length=SAMPLE_TOKENS, num_calibration_samples=NUM_SAMPLES)
    model.save_pretrained(out, save_compressed=True)
    shutil.rmtree(base.parent)


if __name__ == "__main__":
    main(sys.argv[1])
