"""fitserve: an LLM inference server with a paged KV cache and continuous batching.

Offline use: `from fitserve.llm import LLM`; `from fitserve.sampling_params import SamplingParams`.
The package root imports nothing, so torch-free parts stay torch-free.
"""

__version__ = "0.1.0"
