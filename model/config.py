"""TinyMindConfig: one config for the Dense, MoE and MLA variants, using transformers' standard field names."""
import math

from transformers import PretrainedConfig


def default_intermediate_size(hidden_size: int, multiple_of: int = 64) -> int:
    """SwiGLU width: 8/3 of hidden (keeps FFN FLOPs equal to a 4x GELU MLP), rounded up to a multiple of 64."""
    return multiple_of * math.ceil(hidden_size * 8 / 3 / multiple_of)


class TinyMindConfig(PretrainedConfig):
    model_type = "tinymind"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 6400,
        hidden_size: int = 512,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        rope_theta: float = 1e6,
        rope_parameters: dict | None = None,
        rms_norm_eps: float = 1e-6,
        use_qk_norm: bool = False,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        # Mixture of experts (DeepSeekMoE): see model/moe.py
        use_moe: bool = False,
        num_experts: int = 4,
        num_experts_per_tok: int = 2,
        n_shared_experts: int = 1,
        moe_intermediate_size: int | None = None,
        scoring_func: str = "softmax",
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        first_k_dense_replace: int = 0,
        n_group: int = 1,
        topk_group: int = 1,
        moe_balance: str = "aux_free",
        aux_loss_alpha: float = 0.01,
        seq_aux_alpha: float = 1e-4,
        bias_update_speed: float = 1e-3,
        # Multi-head latent attention (DeepSeek-V2): see model/mla.py
        use_mla: bool = False,
        q_lora_rank: int = 0,
        kv_lora_rank: int = 128,
        qk_nope_head_dim: int = 32,
        qk_rope_head_dim: int = 32,
        v_head_dim: int = 64,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size or default_intermediate_size(hidden_size)
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        if rope_parameters is None:
            rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
        rope_parameters.setdefault("rope_theta", rope_theta)
        self.rope_parameters = rope_parameters
        self.rms_norm_eps = rms_norm_eps
        self.use_qk_norm = use_qk_norm
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.use_moe = use_moe
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.moe_intermediate_size = moe_intermediate_size or self.intermediate_size
        self.scoring_func = scoring_func
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.first_k_dense_replace = first_k_dense_replace
        self.n_group = n_group
        self.topk_group = topk_group
        self.moe_balance = moe_balance
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux_alpha = seq_aux_alpha
        self.bias_update_speed = bias_update_speed
        self.use_mla = use_mla
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of each query/key head (MLA rotates only its decoupled slice)."""
        return self.qk_rope_head_dim if self.use_mla else self.head_dim


# Named sizes. `nano` is for unit tests, `tiny` for the CPU demo; `small`/`base` match MiniMind's 26M/104M models.
PRESETS = {
    "nano": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2),
    "base": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2),
}
