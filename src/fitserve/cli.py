"""`fitserve serve`: the command line, with vLLM's flag names and meanings."""

from __future__ import annotations

import argparse
import logging
import sys

from fitserve.config import (
    DEFAULT_BLOCK_SIZE,
    LOAD_FORMATS,
    CacheConfig,
    ConfigError,
    EngineConfig,
    SchedulerConfig,
    parse_size_bytes,
)

logger = logging.getLogger("fitserve")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a Hugging Face folder, a .gguf file or a hub id; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--served-model-name", default=None, help="the name clients send as `model`")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder or hub id, if not the model's own")
    parser.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                        help="'dummy' builds random weights from the model's config.json, for benchmarks")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16), bfloat16, float16 or float32")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler for requests without a seed")
    parser.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="requests batched in one step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="tokens fed in one step (prefill chunks and decodes together)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per KV-cache block")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of the GPU's total memory this server may use (weights, activations, KV)")
    parser.add_argument("--kv-cache-memory-bytes", default=None,
                        help="KV cache size, e.g. 2GiB; on the CPU the default is 1GiB")
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None, help="exact number of KV blocks")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs: launch every decode step from Python (slower; for debugging)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    kv_bytes = None if args.kv_cache_memory_bytes is None else parse_size_bytes(args.kv_cache_memory_bytes)
    return EngineConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        tokenizer=args.tokenizer,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        cache=CacheConfig(
            block_size=args.block_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            kv_cache_memory_bytes=kv_bytes,
            num_gpu_blocks_override=args.num_gpu_blocks_override,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fitserve", description="An LLM inference server with an OpenAI-compatible API.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over the OpenAI API")
    serve.add_argument("model_tag", nargs="?", default=None, help="the model, as `vllm serve MODEL` takes it")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in containers)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require this key as `Authorization: Bearer` on /v1/*")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def serve(args: argparse.Namespace) -> int:
    # Imported here so that `fitserve --help` and config errors answer without loading torch.
    from fitserve.engine.async_engine import AsyncEngine
    from fitserve.llm import build_engine
    from fitserve.server.app import run_server

    if args.model_tag and not args.model:
        args.model = args.model_tag
    config = engine_config_from_args(args)
    built = build_engine(config)
    engine = AsyncEngine(built.engine, built.model_name, built.tokenizer).start()
    try:
        run_server(engine, host=args.host, port=args.port, api_key=args.api_key, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            return serve(args)
    except ConfigError as error:
        print(f"fitserve: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
