"""A model's architecture, read from config.json or GGUF metadata: `ArchConfig` and what it refuses.

Torch-free, so `fitserve plan` reads shapes without loading a model. An architecture fitserve
does not serve, or a feature of one it cannot serve yet (yarn rope scaling, a partial rotary factor
outside Phi-3), is a `ConfigError` here, before any weight is read (docs/models.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from fitserve.config import ConfigError
from fitserve.longrope import LONGROPE_TYPES, LongRopeScaling, longrope_from_hf

@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama 3 style frequency scaling (`rope_type: llama3`); other types are rejected."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class LinearRopeScaling:
    """`rope_type: linear`: every inverse frequency divided by `factor` (Gemma 3 4B and up, global layers)."""

    factor: float


@dataclass(frozen=True, slots=True)
class ArchConfig:
    """The shapes of a Llama-architecture model, read from config.json or GGUF metadata."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | LinearRopeScaling | LongRopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"
    torch_dtype: str = "bfloat16"  # the checkpoint's own dtype
    qkv_bias: bool = False  # q, k and v projections carry a bias (Qwen2)
    qk_norm: bool = False  # an RMSNorm over head_dim on each q and k head, before rotary (Qwen3)
    # Sliding-window attention: a query sees the last `sliding_window` positions up to its own. With
    # `layer_types` empty every layer has the window (Mistral); else only the "sliding_attention"
    # layers do and the "full_attention" ones see the whole context (Gemma 2/3), as config.json says.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    # Mixture of experts (Mixtral, Qwen3-MoE; layers/moe.py): 0 experts is a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k: experts each token is routed to
    moe_intermediate_size: int = 0  # each expert's MLP columns (intermediate_size: the dense MLP's)
    norm_topk_prob: bool = True  # renormalise the k routing weights to sum to 1 (Mixtral always)
    dense_mlp_layers: tuple[int, ...] = ()  # layers of an MoE model with a dense MLP instead of experts
    # Gemma 2/3 (models/gemma2.py): attention scale query_pre_attn_scalar ** -0.5 (else head_dim ** -0.5);
    # scores and final logits soft-capped as cap * tanh(x / cap) when set (Gemma 2); a post-attention and a
    # post-feedforward norm in each layer (4 norms, not 2); the local ("sliding_attention") layers' own
    # rope base (Gemma 3: rope_local_base_freq, without the global layers' rope scaling)
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sandwich_norms: bool = False
    rope_local_theta: float | None = None
    # Rotary on the first `rotary_dim` dims of each head only, the rest passed through (transformers'
    # partial_rotary_factor: Phi-4-mini rotates 96 of 128); None: the whole head. Phi-3 only:
    # models/phi3.py moves the rotated pairs into the kernels' layout (layers/rotary.py).
    rotary_dim: int | None = None

    def __post_init__(self) -> None:
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                              f"num_experts ({self.num_experts}).")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ConfigError(f"The rotary dimensions ({self.rotary_dim}) must be an even number from 2 to head_dim "
                              f"({self.head_dim}).")
        if isinstance(self.rope_scaling, LongRopeScaling):
            self.rope_scaling.check_rotary_dim(self.rotated_dims)

    @property
    def rotated_dims(self) -> int:
        """How many leading dims of each q and k head rotate (rotary_dim, else head_dim)."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def is_moe_layer(self, layer_index: int) -> bool:
        """Whether a layer's MLP is the experts (else the dense MLP of intermediate_size)."""
        return self.num_experts > 0 and layer_index not in self.dense_mlp_layers

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ArchConfig:
        """Build from a Hugging Face config.json dict (transformers 4 or 5 layout)."""
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch in GEMMA_ARCHITECTURES:
            cfg = _gemma_text_config(arch, cfg)
        cfg = _lift_rope_parameters(cfg)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"Architecture {arch!r} is not supported; fitserve serves {', '.join(SUPPORTED_ARCHITECTURES)}."
            )
        _refuse_unsupported_attention(arch, cfg)
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or _DEFAULT_HEAD_DIMS.get(arch) or cfg["hidden_size"] // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rotary_dim=_rotary_dim(cfg, head_dim),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=_parse_rope_scaling(cfg.get("rope_scaling"), cfg, arch),
            max_position_embeddings=_max_positions(arch, cfg),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=arch,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            qkv_bias=arch == "Qwen2ForCausalLM",  # transformers' Qwen2 always has them
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM",
                             "Gemma3ForConditionalGeneration"),
            **_moe_fields(arch, cfg),
            **_window_fields(arch, cfg),
            **(_gemma_fields(arch, cfg) if arch in GEMMA_ARCHITECTURES else {}),
        )

    def shard(self, tensor_parallel_size: int) -> ArchConfig:
        """One GPU's shapes under tensor parallelism: attention heads, KV heads and MLP columns
        divided by N (the same head_dim, hidden size and vocabulary on every rank)."""
        n = tensor_parallel_size
        if n == 1:
            return self
        counts = (("num_attention_heads", self.num_attention_heads),
                  ("num_key_value_heads", self.num_key_value_heads), ("intermediate_size", self.intermediate_size),
                  *((("moe_intermediate_size", self.moe_intermediate_size),) if self.num_experts else ()))
        indivisible = [f"{name} = {value}" for name, value in counts if value % n]
        if indivisible:
            common = math.gcd(*(value for _, value in counts))
            sizes = [str(d) for d in range(1, min(common, 64) + 1) if common % d == 0]
            raise ConfigError(
                f"--tensor-parallel-size {n} does not divide this model's {', '.join(indivisible)}: each GPU "
                f"holds 1/{n} of the attention heads, of the KV heads and of the MLP columns. "
                f"Sizes that divide them all: {', '.join(sizes)}."
            )
        return replace(self, num_attention_heads=self.num_attention_heads // n,
                       num_key_value_heads=self.num_key_value_heads // n,
                       intermediate_size=self.intermediate_size // n,
                       moe_intermediate_size=self.moe_intermediate_size // n)

    def served_at(self, max_model_len: int) -> ArchConfig:
        """This model as served with a context of `max_model_len` tokens (--max-model-len): the same,
        but for LongRoPE, whose factor list follows the served context (longrope.py)."""
        if not isinstance(self.rope_scaling, LongRopeScaling):
            return self
        return replace(self, rope_scaling=self.rope_scaling.served_at(max_model_len))

    def layer_window(self, layer: int) -> int | None:
        """Layer `layer`'s sliding window, or None when it attends over the whole context."""
        if self.sliding_window is None or (self.layer_types and self.layer_types[layer] != "sliding_attention"):
            return None
        return self.sliding_window

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Every layer's window (kv_groups.kv_layout groups the layers by it)."""
        return tuple(self.layer_window(layer) for layer in range(self.num_hidden_layers))

    @property
    def uniform_sliding_window(self) -> int | None:
        """The window when every layer has the same one (Mistral v0.1, Phi-3), else None (none, or
        full and local layers mixed, as Gemma 2/3: those have KV cache groups, kv_groups.py)."""
        windows = {self.layer_window(layer) for layer in range(self.num_hidden_layers)}
        return windows.pop() if len(windows) == 1 else None

    @property
    def kv_elements_per_token(self) -> int:
        """K and V elements per token over all layers; times the KV dtype's size gives bytes."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim


# Gemma 2, Gemma 3 (text) and the text tower of Gemma 3's image-text checkpoints
GEMMA_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Phi3ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM", *GEMMA_ARCHITECTURES)

_DEFAULT_HEAD_DIMS = {"Qwen3ForCausalLM": 128}  # Qwen3MoeConfig's default is hidden_size / heads  # transformers' default for a config.json without head_dim


def _max_positions(arch: str, cfg: dict[str, Any]) -> int:
    return cfg.get("max_position_embeddings", 8192)


QWEN_DEFAULT_MAX_WINDOW_LAYERS = 28  # transformers' Qwen2Config / Qwen3Config default


def _window_fields(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """sliding_window and layer_types as transformers reads them. Mistral (v0.1: 4096; null from
    v0.2 on) and Phi-3 (Phi-3-mini-4k: 2047) window every layer. Qwen2/Qwen3 window only with
    use_sliding_window, and then the layers from max_window_layers on (or those config.json's
    layer_types names); none windowed gives no window, all of them a uniform one."""
    window = cfg.get("sliding_window")
    if arch in ("MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM"):
        return {"sliding_window": window}
    if not (arch.startswith("Qwen") and cfg.get("use_sliding_window") and window):
        return {}
    num_layers = cfg["num_hidden_layers"]
    first = cfg.get("max_window_layers", QWEN_DEFAULT_MAX_WINDOW_LAYERS)
    types = tuple(cfg.get("layer_types") or ("sliding_attention" if i >= first else "full_attention"
                                               for i in range(num_layers)))
    if "sliding_attention" not in types:
        return {}
    return {"sliding_window": window, "layer_types": () if set(types) == {"sliding_attention"} else types}


def _moe_fields(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The experts of Mixtral (`num_local_experts`, each of intermediate_size, always renormalised) and
    Qwen3-MoE (`num_experts`, written `num_local_experts` by transformers 5; `moe_intermediate_size`,
    `norm_topk_prob`; a dense MLP on `mlp_only_layers`, else on layers off every `decoder_sparse_step`)."""
    if arch == "MixtralForCausalLM":
        return {"num_experts": cfg["num_local_experts"], "num_experts_per_tok": cfg.get("num_experts_per_tok", 2),
                "moe_intermediate_size": cfg["intermediate_size"], "norm_topk_prob": True}
    if arch != "Qwen3MoeForCausalLM":
        return {}
    num_experts = cfg.get("num_experts", cfg.get("num_local_experts", 128))
    step, mlp_only = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(cfg["num_hidden_layers"])
                  if i in mlp_only or num_experts == 0 or (i + 1) % step)
    return {"num_experts": num_experts, "num_experts_per_tok": cfg.get("num_experts_per_tok", 8),
            "moe_intermediate_size": cfg.get("moe_intermediate_size", 768),
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)), "dense_mlp_layers": dense}


def _refuse_unsupported_attention(arch: str, cfg: dict[str, Any]) -> None:
    """Config switches of the Qwen configs that fitserve's attention does not implement (real
    Qwen2/2.5/3 checkpoints leave them off): serving them would give wrong numbers."""
    if arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM") and cfg.get("attention_bias"):
        raise ConfigError(f"{arch} with attention_bias is not supported (q, k, v and o biases).")
    partial = _partial_rotary_factor(cfg)
    if partial != 1.0 and arch != "Phi3ForCausalLM":
        raise ConfigError(f"{arch} with partial_rotary_factor {partial} (rotary on part of each head) is not "
                          "supported; fitserve serves it for Phi3ForCausalLM (Phi-4-mini) only.")


def _partial_rotary_factor(cfg: dict[str, Any]) -> float:
    rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    value = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
    return 1.0 if value is None else float(value)


def _rotary_dim(cfg: dict[str, Any], head_dim: int) -> int | None:
    """transformers' int(head_dim * partial_rotary_factor) when below head_dim, else None (the whole head)."""
    rotary_dim = int(head_dim * _partial_rotary_factor(cfg))
    return None if rotary_dim == head_dim else rotary_dim


def _lift_rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes `rope_parameters` {rope_type, rope_theta, factor, ...} in place of
    rope_theta / rope_scaling; lift them back to the keys of the 4.x layout."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return cfg
    out = dict(cfg)
    if "rope_theta" in params:
        out.setdefault("rope_theta", params["rope_theta"])
    if params.get("rope_type", "default") != "default" and not out.get("rope_scaling"):
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def _parse_rope_scaling(raw: dict[str, Any] | None, cfg: dict[str, Any],
                        arch: str) -> RopeScaling | LinearRopeScaling | LongRopeScaling | None:
    if not raw:
        return None
    rope_type = raw.get("rope_type", raw.get("type"))
    if rope_type in (None, "default"):
        return None
    if rope_type == "linear":
        return LinearRopeScaling(factor=float(raw["factor"]))
    if rope_type in LONGROPE_TYPES and arch == "Phi3ForCausalLM":
        return longrope_from_hf(raw, cfg)
    if rope_type in LONGROPE_TYPES:
        raise ConfigError(f"rope_scaling type {rope_type!r} is served for Phi3ForCausalLM only, not {arch}.")
    if rope_type != "llama3":
        raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (only 'llama3', 'linear' and "
                          "'longrope').")
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
    )


# transformers' Gemma2Config / Gemma3TextConfig defaults for keys a config.json may leave out (Gemma 3's
# image-text checkpoints write a text_config of a few keys and rely on them)
_GEMMA_DEFAULTS: dict[str, dict[str, Any]] = {
    "Gemma2ForCausalLM": dict(vocab_size=256000, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                              rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                              final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True,
                              max_position_embeddings=8192, bos_token_id=2, eos_token_id=1),
    "Gemma3ForCausalLM": dict(vocab_size=262208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                              rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                              query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                              tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=2, eos_token_id=1),
}
GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")  # GELU, tanh approximation: what Gemma 2/3 use


def _gemma_text_config(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The text model's config with transformers' defaults filled in; for Gemma3ForConditionalGeneration
    its text_config, with the top level's eos, dtype and tied embeddings (the vision tower is not served)."""
    if arch == "Gemma3ForConditionalGeneration":
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("Gemma3ForConditionalGeneration config.json has no text_config: fitserve serves only "
                              "the text model of Gemma 3 image-text checkpoints, and this one has none.")
        top = {k: cfg[k] for k in ("eos_token_id", "bos_token_id", "torch_dtype", "dtype", "tie_word_embeddings")
               if k in cfg}
        cfg = {**text, **{k: v for k, v in top.items() if k not in text or k == "eos_token_id"}}
    defaults = _GEMMA_DEFAULTS["Gemma2ForCausalLM" if arch == "Gemma2ForCausalLM" else "Gemma3ForCausalLM"]
    out = {**defaults, **{k: v for k, v in cfg.items() if v is not None or k.endswith("softcapping")}}
    out["architectures"] = [arch]
    params = out.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # transformers 5: rope per layer type
        local = params.get("sliding_attention") or {}
        params = out["rope_parameters"] = params["full_attention"] or {}
        out["rope_local_base_freq"] = local.get("rope_theta", out.get("rope_local_base_freq"))
        if local.get("rope_type", "default") != "default":
            raise ConfigError(f"{arch}: rope scaling of the sliding-window layers ({local['rope_type']!r}) is "
                              "not supported.")
    if isinstance(params, dict) and "rope_theta" in params:  # over the default filled in above
        out["rope_theta"] = params["rope_theta"]
    return out


def _gemma_fields(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """ArchConfig fields of Gemma 2/3 from a config.json with defaults filled in (_gemma_text_config)."""
    activation = cfg.get("hidden_activation") or cfg.get("hidden_act") or GEMMA_ACTIVATIONS[0]
    if activation not in GEMMA_ACTIVATIONS:
        raise ConfigError(f"{arch} with hidden_activation {activation!r} is not supported (only gelu_pytorch_tanh).")
    if cfg.get("attention_bias"):
        raise ConfigError(f"{arch} with attention_bias is not supported (q, k, v and o biases).")
    if cfg.get("use_bidirectional_attention"):
        raise ConfigError(f"{arch} with use_bidirectional_attention (an embedding model) is not supported.")
    num_layers = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types")
    if not layer_types:  # older configs: Gemma 2 alternates from a local layer 0; Gemma 3 every Nth is global
        every = 2 if arch == "Gemma2ForCausalLM" else int(cfg.get("sliding_window_pattern") or 6)
        layer_types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(num_layers)]
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ConfigError(f"{arch}: unknown layer_types {sorted(unknown)}.")
    is_gemma3 = arch != "Gemma2ForCausalLM"
    return dict(
        sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
        layer_types=tuple(layer_types),
        query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"]),
        attn_logit_softcap=_optional_float(cfg.get("attn_logit_softcapping")),
        final_logit_softcap=_optional_float(cfg.get("final_logit_softcapping")),
        sandwich_norms=True,
        rope_local_theta=float(cfg["rope_local_base_freq"]) if is_gemma3 else None,
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
