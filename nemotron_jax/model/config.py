"""`ModelConfig`: every field the `nemotron_h` architecture needs, presets, and Hugging Face config I/O.

Layer kinds are written as one character per layer, the `hybrid_override_pattern` form of the released
config: `M` Mamba-2 mixer, `*` attention, `E` mixture of experts, `-` dense squared-ReLU MLP.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from nemotron_jax.model.activations import ACTIVATIONS

LAYER_KINDS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}

# `layers_block_type` names used by transformers (old and new spellings) -> pattern character.
_BLOCK_TYPE_TO_CHAR = {
    "mamba": "M",
    "linear_attention": "M",
    "attention": "*",
    "full_attention": "*",
    "moe": "E",
    "mlp": "-",
}
_CHAR_TO_BLOCK_TYPE = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}

# Legacy Hugging Face keys that transformers remaps (see `NemotronHConfig.__post_init__`).
_LEGACY_HF_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
}

# The names of `nemotron_jax.kernels.grouped_matmul.BACKENDS` (kept here so the config imports no kernels).
MOE_BACKENDS = ("auto", "scan", "blocks", "ragged_dot", "pallas", "pallas_tpu", "pallas_gpu", "megablox", "tokamax")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The names of `model.attention_backends.BACKENDS` (kept here so the config imports no model code).
ATTENTION_BACKENDS = ("auto", "xla", "blockwise", "splash", "cudnn")

# Rematerialisation policies a layer kind can use (`ModelConfig.remat_policy`): "none" keeps every activation
# for the backward pass (no remat); the others name `jax.checkpoint_policies` (what the backward may keep
# instead of recomputing).
REMAT_POLICIES = ("none", "nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable")


def parse_remat_policy(spec: str) -> dict[str, str]:
    """`ModelConfig.remat_policy` -> {layer kind: policy} for the four kinds of `LAYER_KINDS`.

    `spec` is one policy for every kind ("nothing_saveable") or comma-separated `kind=policy` entries
    ("mamba=nothing_saveable,moe=dots_saveable"; kinds not named get "none"). Raises ValueError naming the
    bad entry.
    """
    kinds = tuple(LAYER_KINDS.values())
    if not isinstance(spec, str):
        raise ValueError(f"expected a string, got {spec!r}")
    spec = spec.strip()
    if "=" not in spec:
        if spec not in REMAT_POLICIES:
            raise ValueError(f"unknown policy {spec!r}; one of {REMAT_POLICIES} (or kind=policy entries)")
        return {kind: spec for kind in kinds}
    policies = {kind: "none" for kind in kinds}
    seen = set()
    for entry in spec.split(","):
        kind, _, policy = (part.strip() for part in entry.partition("="))
        if kind not in kinds:
            raise ValueError(f"entry {entry.strip()!r}: unknown layer kind {kind!r}; one of {kinds}")
        if kind in seen:
            raise ValueError(f"entry {entry.strip()!r}: layer kind {kind!r} given twice")
        if policy not in REMAT_POLICIES:
            raise ValueError(f"entry {entry.strip()!r}: unknown policy {policy!r}; one of {REMAT_POLICIES}")
        seen.add(kind)
        policies[kind] = policy
    return policies


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a `nemotron_h` model (Nemotron-3-Nano / Nemotron-Cascade-2).

    Sizes follow the Hugging Face field names so that `from_hf_config` / `to_hf_config` are a renaming.
    """

    vocab_size: int
    hidden_size: int
    layer_pattern: str  # one of `M*E-` per layer, e.g. "MEMEM*E..."

    # Attention (GQA, no positional encoding, causal).
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    # Mamba-2 mixer. d_inner = mamba_num_heads * mamba_head_dim.
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int = 4
    chunk_size: int = 128
    expand: int = 2  # kept for the HF config round trip; d_inner comes from heads * head_dim
    use_conv_bias: bool = True
    use_bias: bool = False  # bias of the Mamba in_proj / out_proj
    time_step_min: float = 0.001  # also the lower clamp of dt (transformers' `time_step_limit`)
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4

    # Dense MLP ('-' layers), routed and shared experts: non-gated, `down(act(up(x)))`, act squared ReLU
    # in the released models (see `ACTIVATIONS` in mlp.py for the others transformers allows).
    intermediate_size: int = 0
    mlp_bias: bool = False
    mlp_hidden_act: str = "relu2"

    # Mixture of experts ('E' layers).
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_shared_expert_intermediate_size: int = 0
    n_shared_experts: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    # Latent MoE (Nemotron-3-Super): routed experts work in a `moe_latent_size` space between
    # fc1_latent_proj / fc2_latent_proj. None in Nano / Cascade-2.
    moe_latent_size: int | None = None
    # Multi-token-prediction heads: not built (as in transformers); kept for the config round trip, and their
    # `mtp.*` checkpoint tensors are skipped on load.
    num_nextn_predict_layers: int = 0

    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    tie_word_embeddings: bool = False  # recorded only: transformers' nemotron_h never ties lm_head
    max_position_embeddings: int = 262144
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0

    # Numerics: parameters are stored in `param_dtype`, matmuls run in `compute_dtype`. The router, norms,
    # softmax and the SSM state are always float32.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    # MoE expert computation (dropless): the grouped-matmul backend of the routed experts
    # (`kernels.grouped_matmul.BACKENDS`): "auto" (per platform: "blocks" on CPU, "tokamax" on GPU/TPU),
    # "blocks", "scan" (plain-JAX reference), "ragged_dot", "pallas" (own Pallas kernels; "pallas_tpu" /
    # "pallas_gpu" force a lowering, interpreted off its platform), "megablox",
    # "tokamax". `moe_tile_rows` is their row tile; for "blocks" it is the alignment of each expert's rows
    # (64: ~5% padding at top-6 of 64 experts over 4K tokens, 128: ~18%), and `moe_visit_tiles` the largest
    # matmul of "blocks" in tiles (one scan step runs up to that many tiles of one expert as one product).
    # tokamax ignores the tile; for "pallas"/"megablox" on TPU, 128 matches the MXU better than the default.
    moe_backend: str = "auto"
    moe_tile_rows: int = 64
    moe_visit_tiles: int = 8
    # Attention of the training forward (no decode cache; decoding always uses "xla"), see
    # `model.attention_backends`: "xla" (einsum, [T, T] float32 scores), "blockwise" (plain-JAX flash
    # attention, memory linear in T), "splash" (Pallas TPU kernel), "cudnn" (GPU; packed batches fall back to
    # blockwise at run time; off GPU jax's quadratic "xla" implementation), or "auto": splash on TPU, cudnn on
    # GPU in bfloat16/float16, else xla up to 2048 tokens and blockwise beyond. `attention_block_q` /
    # `attention_block_kv`: the query / key tiles of blockwise (splash uses the larger, at least 128).
    attention_backend: str = "auto"
    attention_block_q: int = 512
    attention_block_kv: int = 512
    # Layer loop: `scan_layers` runs each periodic stretch of the layer pattern as one `lax.scan` over stacked
    # parameters (compile time independent of depth; see `layer_stack.layer_plan`), else every layer is
    # unrolled. `scan_optional_layers`: the plan may give a scanned unit one optional position (Nano: "M*E" x 23,
    # the attention in 6 repeats; 3 layers compiled instead of 14); False keeps plain periodic segments (e.g. to
    # restore an Orbax checkpoint written in that layout). `remat_policy`: a policy of `REMAT_POLICIES` for all
    # layers, or per kind ("mamba=nothing_saveable,moe=dots_saveable"; unnamed kinds "none"), see
    # `parse_remat_policy`.
    scan_layers: bool = False
    scan_optional_layers: bool = True
    remat_policy: str = "none"
    # Expert parallelism (a mesh with an `expert` axis, see nemotron_jax/parallel): how token copies travel to
    # their expert's device: "auto" (ragged_all_to_all on TPU/GPU, all_to_all elsewhere), "ragged_all_to_all",
    # or "all_to_all" (dense, capacity-padded to the worst case: dropless, runs on XLA:CPU).
    moe_ep_transport: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raises `ValueError` naming the offending field for unknown or inconsistent values."""

        def fail(field: str, message: str) -> None:
            raise ValueError(f"ModelConfig.{field}: {message}")

        for field in ("vocab_size", "hidden_size"):
            if getattr(self, field) <= 0:
                fail(field, f"must be positive, got {getattr(self, field)}")
        if not self.layer_pattern:
            fail("layer_pattern", "is empty; the model needs at least one layer")
        bad = sorted({c for c in self.layer_pattern if c not in LAYER_KINDS})
        if bad:
            fail("layer_pattern", f"has characters {bad}; allowed are 'M', '*', 'E', '-'")
        kinds = set(self.layer_pattern)
        if "*" in kinds:
            for field in ("num_attention_heads", "num_key_value_heads", "head_dim"):
                if getattr(self, field) <= 0:
                    fail(field, f"must be positive for attention layers, got {getattr(self, field)}")
            if self.num_attention_heads % self.num_key_value_heads:
                fail(
                    "num_key_value_heads",
                    f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}",
                )
        if "M" in kinds:
            for field in ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
                          "chunk_size"):
                if getattr(self, field) <= 0:
                    fail(field, f"must be positive for Mamba layers, got {getattr(self, field)}")
            if self.mamba_num_heads % self.n_groups:
                fail("n_groups", f"{self.n_groups} does not divide mamba_num_heads={self.mamba_num_heads}")
            if self.time_step_min < 0 or self.time_step_max < self.time_step_min:
                fail("time_step_min", f"need 0 <= time_step_min <= time_step_max, got "
                                      f"{self.time_step_min}, {self.time_step_max}")
        if "-" in kinds and self.intermediate_size <= 0:
            fail("intermediate_size", f"must be positive for MLP layers, got {self.intermediate_size}")
        if "E" in kinds:
            for field in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                          "moe_shared_expert_intermediate_size", "n_group", "topk_group"):
                if getattr(self, field) <= 0:
                    fail(field, f"must be positive for MoE layers, got {getattr(self, field)}")
            if self.num_experts_per_tok > self.n_routed_experts:
                fail("num_experts_per_tok",
                     f"top-k {self.num_experts_per_tok} > n_routed_experts {self.n_routed_experts}")
            if self.n_routed_experts % self.n_group:
                fail("n_group", f"{self.n_group} does not divide n_routed_experts={self.n_routed_experts}")
            if self.topk_group > self.n_group:
                fail("topk_group", f"{self.topk_group} > n_group {self.n_group}")
            experts_per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and experts_per_group < 2:
                fail("n_group", "group scores sum the top-2 experts of a group; need >= 2 experts per group")
            if self.num_experts_per_tok > self.topk_group * experts_per_group:
                fail("num_experts_per_tok",
                     f"top-k {self.num_experts_per_tok} exceeds the {self.topk_group * experts_per_group} "
                     "experts left after group-limited routing (topk_group * experts per group)")
        if self.moe_latent_size is not None and self.moe_latent_size <= 0:
            fail("moe_latent_size", f"must be positive or None, got {self.moe_latent_size}")
        if self.mlp_hidden_act not in ACTIVATIONS:
            fail("mlp_hidden_act", f"unknown activation {self.mlp_hidden_act!r}; one of {sorted(ACTIVATIONS)}")
        for field in ("param_dtype", "compute_dtype"):
            if getattr(self, field) not in _DTYPES:
                fail(field, f"unknown dtype {getattr(self, field)!r}; one of {sorted(_DTYPES)}")
        if self.moe_backend not in MOE_BACKENDS:
            fail("moe_backend", f"unknown backend {self.moe_backend!r}; one of {MOE_BACKENDS}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            fail("attention_backend", f"unknown backend {self.attention_backend!r}; one of {ATTENTION_BACKENDS}")
        for field in ("attention_block_q", "attention_block_kv"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                fail(field, f"must be a positive int, got {getattr(self, field)!r}")
        if self.moe_ep_transport not in ("auto", "ragged_all_to_all", "all_to_all"):
            fail("moe_ep_transport", f"unknown transport {self.moe_ep_transport!r}; one of 'auto', "
                                     "'ragged_all_to_all', 'all_to_all'")
        if self.moe_tile_rows <= 0:
            fail("moe_tile_rows", f"must be positive, got {self.moe_tile_rows}")
        if self.moe_visit_tiles <= 0:
            fail("moe_visit_tiles", f"must be positive, got {self.moe_visit_tiles}")
        if self.layer_norm_epsilon <= 0:
            fail("layer_norm_epsilon", f"must be positive, got {self.layer_norm_epsilon}")
        if not isinstance(self.scan_layers, bool):
            fail("scan_layers", f"must be a bool, got {self.scan_layers!r}")
        if not isinstance(self.scan_optional_layers, bool):
            fail("scan_optional_layers", f"must be a bool, got {self.scan_optional_layers!r}")
        try:
            parse_remat_policy(self.remat_policy)
        except ValueError as error:
            fail("remat_policy", str(error))

    # ----------------------------------------------------------------------------------- derived sizes
    @property
    def num_layers(self) -> int:
        return len(self.layer_pattern)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_dim(self) -> int:
        return self.mamba_d_inner + self.mamba_conv_dim + self.mamba_num_heads

    @property
    def moe_expert_dim(self) -> int:
        """Input/output width of the routed experts: the latent size if set, else hidden_size."""
        return self.moe_latent_size or self.hidden_size

    @property
    def remat_policies(self) -> dict[str, str]:
        """{layer kind: remat policy name} parsed from `remat_policy`."""
        return parse_remat_policy(self.remat_policy)

    @property
    def param_jnp_dtype(self) -> Any:
        return _DTYPES[self.param_dtype]

    @property
    def compute_jnp_dtype(self) -> Any:
        return _DTYPES[self.compute_dtype]

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """`tiny` (seconds on CPU, all four layer kinds) or `nano_30b_a3b` (the released 30B-A3B config)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    # ------------------------------------------------------------------------------ Hugging Face config
    @classmethod
    def from_hf_config(cls, hf_config: Mapping[str, Any], **overrides: Any) -> "ModelConfig":
        """Builds a config from a `config.json` dict of `NemotronHForCausalLM`.

        Reads the layer layout from `hybrid_override_pattern` (a string of `M*E-`) or from
        `layers_block_type` (a list of "mamba"/"linear_attention", "attention"/"full_attention", "moe",
        "mlp"), and the legacy `mamba_*` key spellings. Unknown layer types raise `ValueError`.
        """
        hf = dict(hf_config)
        for legacy, name in _LEGACY_HF_KEYS.items():
            if legacy in hf and name not in hf:
                hf[name] = hf[legacy]
        pattern = hf.get("hybrid_override_pattern")
        block_types = hf.get("layers_block_type") or hf.get("layer_types")
        if block_types is not None:
            if isinstance(block_types, str) or not isinstance(block_types, (list, tuple)):
                raise ValueError(f"HF config field layers_block_type: expected a list, got {block_types!r}")
            unknown = sorted({t for t in block_types if t not in _BLOCK_TYPE_TO_CHAR})
            if unknown:
                raise ValueError(
                    f"HF config field layers_block_type: unknown layer types {unknown}; "
                    f"known are {sorted(_BLOCK_TYPE_TO_CHAR)}"
                )
            from_list = "".join(_BLOCK_TYPE_TO_CHAR[t] for t in block_types)
            if pattern and pattern != from_list:
                raise ValueError(
                    "HF config fields hybrid_override_pattern and layers_block_type disagree: "
                    f"{pattern!r} vs {from_list!r}"
                )
            pattern = from_list
        if not pattern:
            raise ValueError("HF config has neither hybrid_override_pattern nor layers_block_type")
        if not isinstance(pattern, str):
            raise ValueError(f"HF config field hybrid_override_pattern: expected a string, got {pattern!r}")
        if "num_hidden_layers" in hf and hf["num_hidden_layers"] not in (None, len(pattern)):
            raise ValueError(
                f"HF config field num_hidden_layers={hf['num_hidden_layers']} does not match the "
                f"{len(pattern)} layers of the layer pattern"
            )
        if hf.get("mamba_hidden_act", "silu") != "silu":
            raise ValueError(
                f"HF config field mamba_hidden_act: only 'silu' is supported, got {hf['mamba_hidden_act']!r}")
        # `time_step_limit` is not read: transformers' mixer clamps dt to [time_step_min, inf) whatever it says.

        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names}
        kwargs["layer_pattern"] = pattern
        if "head_dim" not in hf or hf["head_dim"] is None:
            kwargs["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
        if hf.get("num_key_value_heads") is None and "num_attention_heads" in hf:
            kwargs["num_key_value_heads"] = hf["num_attention_heads"]
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        dtype = hf.get("torch_dtype") or hf.get("dtype")
        if dtype in _DTYPES and "param_dtype" not in overrides:
            kwargs["param_dtype"] = dtype
            kwargs["compute_dtype"] = dtype
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in kwargs and n not in overrides]
        if missing:
            raise ValueError(f"HF config is missing required fields {missing}")
        return cls(**{**kwargs, **overrides})

    def to_hf_config(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' `NemotronHForCausalLM` loads."""
        skip = {"layer_pattern", "param_dtype", "compute_dtype", "moe_backend", "moe_tile_rows", "moe_visit_tiles",
                "scan_layers", "scan_optional_layers", "remat_policy", "moe_ep_transport", "attention_backend", "attention_block_q",
                "attention_block_kv"}
        hf: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }
        hf.update(
            architectures=["NemotronHForCausalLM"],
            model_type="nemotron_h",
            layers_block_type=[_CHAR_TO_BLOCK_TYPE[c] for c in self.layer_pattern],
            num_hidden_layers=self.num_layers,
            mamba_hidden_act="silu",
            torch_dtype=self.param_dtype,
        )
        return hf


_NANO_30B_A3B = dict(
    vocab_size=131072,
    hidden_size=2688,
    layer_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    num_attention_heads=32,
    num_key_value_heads=2,
    head_dim=128,
    mamba_num_heads=64,
    mamba_head_dim=64,
    ssm_state_size=128,
    n_groups=8,
    conv_kernel=4,
    chunk_size=128,
    expand=2,
    use_conv_bias=True,
    use_bias=False,
    time_step_min=0.001,
    time_step_max=0.1,
    time_step_floor=1e-4,
    intermediate_size=1856,
    mlp_bias=False,
    n_routed_experts=128,
    num_experts_per_tok=6,
    moe_intermediate_size=1856,
    moe_shared_expert_intermediate_size=3712,
    n_shared_experts=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    n_group=1,
    topk_group=1,
    layer_norm_epsilon=1e-5,
    max_position_embeddings=262144,
    param_dtype="bfloat16",
    compute_dtype="bfloat16",
)

_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    layer_pattern="M*EM-E",
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    mamba_num_heads=8,
    mamba_head_dim=16,
    ssm_state_size=16,
    n_groups=2,
    conv_kernel=4,
    chunk_size=16,
    intermediate_size=128,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=64,
    routed_scaling_factor=2.5,
    moe_tile_rows=16,
    max_position_embeddings=4096,
)

_PRESETS = {"tiny": _TINY, "nano_30b_a3b": _NANO_30B_A3B}
