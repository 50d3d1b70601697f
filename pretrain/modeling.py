"""AVViT: one Vision Transformer shared by audio and video (SSAVSV, after AVSiam / CAV-MAE).

Architecture only: no engine and no distributed code. The pretraining objective (masking, views,
losses, projection heads) is `objective.PretrainingObjective`; `AVViTForPretraining` holds it beside
the encoder and decoder and hands it the process group its caller passes.

- Audio: fbank `[B, T, F]` -> one-channel image `[B, 1, F, T_pad]` -> `p x p` patches (own patch
  embedding) -> `[B, La, D]`, frequency-major. Video: `[B, V, 3, H, W]` -> RGB patches per frame (own
  patch embedding) -> `[B, V*h*w, D]`, frame-major. Each modality adds its positional embedding
  (2-D sin-cos or learned; video adds a per-frame embedding) and a learned modality embedding.
- The transformer blocks (attention and MLP) are shared; LayerNorms are per modality when
  `separate_modality_norms` (AVSiam), applied to each modality's slice of the sequence.
- Input modes from the same weights: audio only, video only, audio-visual (one sequence
  `[audio CLS?][audio tokens][video CLS?][video tokens]`, joint attention). Per-sample presence
  (`has_audio`, `has_video`) and per-sample visible counts become a key-padding mask
  `attention_mask: bool [B, 1, 1, N]`, True = attend, so a sample attends only to its own real tokens;
  a sample with no real token attends to its first token (never a fully masked row: SDPA would
  return NaN); its outputs are meaningless and are zeroed in the pooled embeddings.
- Attention goes through transformers' registry: `config._attn_implementation` picks "eager" (the
  reference below), "sdpa", or any registered name ("triton" is registered on demand by
  `avssl.kernels.hf_attention.register_attention`).
- `AVViTForPretraining` = encoder + light decoder + the objective, whose `forward` runs the
  contrastive view (each modality encoded alone, lightly masked), the segment view and the
  reconstruction view (both modalities jointly, heavily masked; decoder with mask tokens; loss on
  masked patches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .config import LossConfig, MaskingConfig
from .configuration import AVViTConfig
from .masking import ModalityMask
from .inputs import AVInputs
from .objective import AVViTForPretrainingOutput, ContrastiveProjection, PretrainingObjective

# Modality segments of a sequence, in order: (("audio", La), ("video", Lv)).
Segments = tuple[tuple[str, int], ...]
MODALITIES = ("audio", "video")


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in the backward pass. transformers names the switch
    `activation_checkpointing_enable` from 5.2x on and `gradient_checkpointing_enable` before
    (5.17 is what the GPU image has): call whichever the installed version has."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def ensure_attention_implementation(name: str | None) -> None:
    """Make `name` resolvable in transformers' attention registry before a model is built.

    "triton" lives in avssl.kernels and is registered on first request (imported here, not at module
    import: the kernels need triton, which the model itself does not)."""
    if name != "triton" or "triton" in ALL_ATTENTION_FUNCTIONS:
        return
    try:
        from avssl.kernels.hf_attention import register_attention
    except ImportError as exc:
        raise ImportError(
            "attn_implementation='triton' needs avssl.kernels.hf_attention.register_attention(), which could not be imported "
            f"({exc}). Install/fix the kernels package or set model.attn_implementation to 'sdpa' or 'eager'."
        ) from exc
    register_attention()
    if "triton" not in ALL_ATTENTION_FUNCTIONS:
        raise ImportError("avssl.kernels.hf_attention.register_attention() did not register the 'triton' attention implementation")


# ---------------------------------------------------------------------------------------------
# Positional embeddings


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Positions [n] -> [n, dim]: sin on the first half of the channels, cos on the second (MAE)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (n, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_position_embedding(dim: int, grid: Sequence[int]) -> torch.Tensor:
    """Fixed sin-cos code of a 1-D `(n,)` or row-major 2-D `(h, w)` grid: [prod(grid), dim]; in 2-D
    half of the channels encode the row, half the column."""
    if len(grid) == 1:
        return sincos_1d(dim, torch.arange(grid[0]))
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1)


def resize_position_embedding(weight: torch.Tensor, src: Sequence[int], dst: Sequence[int]) -> torch.Tensor:
    """Interpolate a learned embedding [1, prod(src), D] to [1, prod(dst), D]: bicubic on a 2-D grid
    (as ViT / DeiT fine-tuning at another resolution), linear on a 1-D one."""
    dim = weight.shape[-1]
    if len(src) == 1:
        x = weight.transpose(1, 2).float()  # (1, D, n)
        x = F.interpolate(x, size=int(dst[0]), mode="linear", align_corners=False)  # (1, D, n')
        return x.transpose(1, 2).to(weight.dtype)
    x = weight.reshape(1, src[0], src[1], dim).permute(0, 3, 1, 2).float()  # (1, D, h, w)
    x = F.interpolate(x, size=(int(dst[0]), int(dst[1])), mode="bicubic", align_corners=False)  # (1, D, h', w')
    return x.permute(0, 2, 3, 1).reshape(1, -1, dim).to(weight.dtype)  # (1, h'*w', D)


class GridPositionEmbedding(nn.Module):
    """Positional embedding of a 1-D or 2-D token grid, stored for `grid`: weight [1, prod(grid), D].

    Another grid gets a recomputed sin-cos code (fixed type) or an interpolated copy (learned type).
    """

    def __init__(self, dim: int, grid: Sequence[int], learned: bool):
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        self.learned = learned
        self.weight = nn.Parameter(torch.zeros(1, math.prod(self.grid), dim), requires_grad=learned)

    def forward(self, grid: Sequence[int]) -> torch.Tensor:
        """-> [1, prod(grid), D]"""
        grid = tuple(int(g) for g in grid)
        if grid == self.grid:
            return self.weight
        if self.learned:
            return resize_position_embedding(self.weight, self.grid, grid)
        return sincos_position_embedding(self.weight.shape[-1], grid).to(self.weight)[None]


class ModalityPositions(nn.Module):
    """Positions plus modality embedding at one width (used by the encoder and by the decoder).

    audio: 2-D grid (frequency, time); video: 2-D spatial grid shared by all frames + 1-D frame code.
    """

    def __init__(self, config: AVViTConfig, dim: int):
        super().__init__()
        learned = config.pos_embed_type == "learned"
        self.audio = GridPositionEmbedding(dim, config.audio_grid(), learned)
        self.video_spatial = GridPositionEmbedding(dim, config.video_grid(), learned)
        self.video_frame = GridPositionEmbedding(dim, (config.video_num_frames,), learned)
        self.audio_modality = nn.Parameter(torch.zeros(1, 1, dim))
        self.video_modality = nn.Parameter(torch.zeros(1, 1, dim))

    def audio_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """-> [1, nf * nt, D]"""
        return self.audio(grid) + self.audio_modality

    def video_embedding(self, frames: int, grid: tuple[int, int]) -> torch.Tensor:
        """-> [1, V * h * w, D], frame-major"""
        spatial = self.video_spatial(grid)  # (1, h*w, D)
        frame = self.video_frame((frames,))  # (1, V, D)
        pos = frame[:, :, None, :] + spatial[:, None, :, :]  # (1, V, h*w, D)
        return pos.reshape(1, frames * grid[0] * grid[1], -1) + self.video_modality


# ---------------------------------------------------------------------------------------------
# Embeddings


class AVViTEmbeddings(nn.Module):
    """Per-modality patch embeddings, positions, modality embeddings and optional CLS tokens."""

    def __init__(self, config: AVViTConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        p = config.audio_patch_size
        self.audio_patch_embed = nn.Conv2d(1, dim, kernel_size=p, stride=(config.audio_freq_stride, config.audio_time_stride))
        q = config.video_patch_size
        self.video_patch_embed = nn.Conv2d(3, dim, kernel_size=q, stride=q)
        self.positions = ModalityPositions(config, dim)
        if config.use_cls_token:
            self.audio_cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.video_cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    # ---- geometry ----

    def audio_grid(self, audio: torch.Tensor) -> tuple[int, int]:
        """(frequency patches, time patches) of a batch `[B, T, F]`."""
        return self.config.audio_grid(audio.shape[1])

    def video_grid(self, video: torch.Tensor) -> tuple[int, int, int]:
        """(frames, patch rows, patch columns) of a batch `[B, V, 3, H, W]`."""
        return (video.shape[1], *self.config.video_grid((video.shape[-2], video.shape[-1])))

    def audio_image(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, T, F] -> [B, 1, F, T_pad]: frequency as height, time as width, zero-padded in time to the
        patch grid (the fbank is mean-normalized, so 0 is the neutral value)."""
        if audio.ndim != 3 or audio.shape[-1] != self.config.audio_num_mel_bins:
            raise ValueError(
                f"audio must be [B, T, {self.config.audio_num_mel_bins}] (frames x mel bins), got {tuple(audio.shape)}"
            )
        frames = audio.shape[1]
        pad = self.config.audio_padded_frames(frames) - frames
        x = audio.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        return F.pad(x, (0, pad)) if pad else x  # (B, 1, F, T_pad)

    def _check_video(self, video: torch.Tensor) -> None:
        q = self.config.video_patch_size
        if video.ndim != 5 or video.shape[2] != 3 or video.shape[-1] % q or video.shape[-2] % q:
            raise ValueError(f"video must be [B, V, 3, H, W] with H, W multiples of {q}, got {tuple(video.shape)}")

    # ---- tokens ----

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, T, F] -> all audio patch tokens with position and modality: [B, nf * nt, D]."""
        weight = self.audio_patch_embed.weight
        x = self.audio_patch_embed(self.audio_image(audio).to(weight.dtype))  # (B, D, nf, nt)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, nf*nt, D)
        return x + self.positions.audio_embedding(grid)

    def embed_video(self, video: torch.Tensor) -> torch.Tensor:
        """[B, V, 3, H, W] -> all video patch tokens with position and modality: [B, V * h * w, D]."""
        self._check_video(video)
        batch, frames = video.shape[:2]
        weight = self.video_patch_embed.weight
        x = self.video_patch_embed(video.flatten(0, 1).to(weight.dtype))  # (B*V, D, h, w)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2).reshape(batch, frames * grid[0] * grid[1], -1)  # (B, V*h*w, D)
        return x + self.positions.video_embedding(frames, grid)

    def cls_token(self, modality: str) -> torch.Tensor:
        """[1, 1, D] CLS token of a modality (with its modality embedding)."""
        return getattr(self, f"{modality}_cls_token") + getattr(self.positions, f"{modality}_modality")

    # ---- reconstruction targets ----

    def patchify_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, T, F] -> [B, nf * nt, p * p], the pixels of each audio token (same unfold as the patch
        embedding, so overlapping strides give overlapping targets)."""
        p = self.config.audio_patch_size
        stride = (self.config.audio_freq_stride, self.config.audio_time_stride)
        return F.unfold(self.audio_image(audio), kernel_size=p, stride=stride).transpose(1, 2)

    def patchify_video(self, video: torch.Tensor) -> torch.Tensor:
        """[B, V, 3, H, W] -> [B, V * h * w, 3 * p * p] (channel-major inside a patch)."""
        self._check_video(video)
        batch, frames = video.shape[:2]
        q = self.config.video_patch_size
        x = F.unfold(video.flatten(0, 1), kernel_size=q, stride=q)  # (B*V, 3*q*q, h*w)
        x = x.transpose(1, 2)  # (B*V, h*w, 3*q*q)
        return x.reshape(batch, -1, x.shape[-1])  # (B, V*h*w, 3*q*q)


# ---------------------------------------------------------------------------------------------
# Transformer blocks


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention. query/key/value: [B, H, N, Dh]; attention_mask: bool [B, 1, 1, N]
    (True = attend) or an additive float mask, or None. Returns ([B, N, H, Dh], weights [B, H, N, N])."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, N, N)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, N, H, Dh)
    return output, weights


class AVViTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; the kernel comes from the registry."""

    def __init__(self, config: AVViTConfig, hidden_size: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # read by transformers' sdpa wrapper (its default is causal)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """hidden_states: [B, N, D]; attention_mask: bool [B, 1, 1, N] or None -> ([B, N, D], weights | None)"""
        batch, length, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )  # (B, N, H, Dh)
        output = output.reshape(batch, length, dim)
        return self.proj(output), weights


class AVViTMLP(nn.Module):
    def __init__(self, config: AVViTConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ModalityLayerNorm(nn.ModuleDict):
    """LayerNorm per modality (keys "audio", "video") or one shared (key "shared").

    With per-modality norms each segment of the sequence is normalized by its own modality's norm."""

    def __init__(self, dim: int, names: Sequence[str], eps: float):
        super().__init__({name: nn.LayerNorm(dim, eps=eps) for name in names})

    def forward(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """x: [B, N, D] laid out as `segments` -> [B, N, D]"""
        if "shared" in self:
            return self["shared"](x)
        if len(segments) == 1:
            return self[segments[0][0]](x)
        parts = x.split([length for _, length in segments], dim=1)
        return torch.cat([self[name](part) for (name, _), part in zip(segments, parts, strict=True)], dim=1)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch per sample with probability `rate`, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class AVViTLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(LN1(x)); x + mlp(LN2(x)), LNs per modality or shared."""

    def __init__(
        self,
        config: AVViTConfig,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        norm_names: Sequence[str],
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.norm1 = ModalityLayerNorm(hidden_size, norm_names, config.layer_norm_eps)
        self.attention = AVViTAttention(config, hidden_size, num_heads)
        self.norm2 = ModalityLayerNorm(hidden_size, norm_names, config.layer_norm_eps)
        self.mlp = AVViTMLP(config, hidden_size, intermediate_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path_rate = drop_path_rate

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, segments: Segments = ()
    ) -> torch.Tensor:
        """hidden_states: [B, N, D] -> [B, N, D]"""
        attn, _ = self.attention(self.norm1(hidden_states, segments), attention_mask)
        hidden_states = hidden_states + drop_path(self.dropout(attn), self.drop_path_rate, self.training)
        mlp = self.mlp(self.norm2(hidden_states, segments))
        return hidden_states + drop_path(self.dropout(mlp), self.drop_path_rate, self.training)


def key_padding_mask(valids: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-segment real-token masks [B, L_i] -> attention mask bool [B, 1, 1, sum L_i], True = attend.

    A sample without any real token keeps its first token, so no attention row is fully masked."""
    valid = torch.cat(list(valids), dim=1)  # (B, N)
    attend = valid.clone()
    attend[:, 0] |= ~valid.any(dim=1)
    return attend[:, None, None, :]


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class AVViTModelOutput(ModelOutput):
    """Encoder outputs. N = tokens of the whole sequence; La / Lv = tokens of each modality segment
    (the CLS token first when `use_cls_token`); missing modalities give None.

    last_hidden_state: [B, N, D] after the final norm(s).
    audio_last_hidden_state, video_last_hidden_state: [B, La, D], [B, Lv, D] slices of it.
    audio_token_mask, video_token_mask: [B, La], [B, Lv] bool, True = a real token of a present modality.
    audio_embeds, video_embeds: [B, D] pooled per modality (CLS output, or mean of real tokens); zeros
        for samples lacking the modality.
    fused_embeds: [B, D] mean of the pooled embeddings of the modalities a sample has.
    hidden_states: (embedding output, output of every layer), each [B, N, D] (before the final norm),
        when `output_hidden_states`.
    intermediate_hidden_states: outputs of the layers listed in `output_layers` (same convention).
    """

    last_hidden_state: torch.Tensor | None = None
    audio_last_hidden_state: torch.Tensor | None = None
    video_last_hidden_state: torch.Tensor | None = None
    audio_token_mask: torch.Tensor | None = None
    video_token_mask: torch.Tensor | None = None
    audio_embeds: torch.Tensor | None = None
    video_embeds: torch.Tensor | None = None
    fused_embeds: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    intermediate_hidden_states: tuple[torch.Tensor, ...] | None = None


class AVViTPreTrainedModel(PreTrainedModel):
    config_class = AVViTConfig
    config: AVViTConfig
    base_model_prefix = "avvit"
    main_input_name = "audio"
    input_modalities = ("audio", "video")
    supports_gradient_checkpointing = True
    _no_split_modules = ["AVViTLayer"]
    _supports_sdpa = True
    # Attention is dispatched through the registry, so any registered implementation works.
    _supports_attention_backend = True

    def __init__(self, config: AVViTConfig, *inputs, **kwargs):
        # PreTrainedModel.__init__ validates the name against the registry: register "triton" first.
        ensure_attention_implementation(config._attn_implementation)
        super().__init__(config, *inputs, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """MAE's initialization: xavier-uniform linears (qkv as three D x D matrices) and patch
        embeddings, unit LayerNorms, N(0, 0.02) tokens; `init.*` leaves loaded tensors alone."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # xavier-uniform of the kernel seen as a [out, in * k * k] matrix, as MAE's patch embedding.
            fan_in = module.in_channels * math.prod(module.kernel_size)
            bound = math.sqrt(6.0 / (fan_in + module.out_channels))
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, AVViTAttention):
            dim = module.qkv.weight.shape[1]
            bound = math.sqrt(6.0 / (dim + dim))
            init.uniform_(module.qkv.weight, -bound, bound)
        elif isinstance(module, GridPositionEmbedding):
            if module.learned:
                init.trunc_normal_(module.weight, std=std)
            else:
                code = sincos_position_embedding(module.weight.shape[-1], module.grid)[None]
                init.copy_(module.weight, code.to(module.weight))
        elif isinstance(module, ModalityPositions):
            init.trunc_normal_(module.audio_modality, std=std)
            init.trunc_normal_(module.video_modality, std=std)
        elif isinstance(module, AVViTEmbeddings):
            if self.config.use_cls_token:
                init.trunc_normal_(module.audio_cls_token, std=std)
                init.trunc_normal_(module.video_cls_token, std=std)
        elif isinstance(module, AVViTDecoder):
            init.normal_(module.mask_token, std=std)
        elif isinstance(module, ContrastiveProjection):
            init.ones_(module.norm_weight)
            init.zeros_(module.norm_bias)
        elif isinstance(module, PretrainingObjective) and module.loss.learn_temperature:
            init.constant_(module.logit_scale, math.log(1.0 / module.loss.temperature))


class AVViTModel(AVViTPreTrainedModel):
    """The shared audio-visual encoder (features for heads).

    forward(audio=None, video=None, has_audio=None, has_video=None, ...) -> AVViTModelOutput
      audio: [B, T, F] fbank; video: [B, V, 3, H, W]; has_audio / has_video: [B] bool presence
      (absent inputs are zero-filled; None = all present). Give one modality for unimodal mode, both for
      the joint audio-visual sequence.
    """

    def __init__(self, config: AVViTConfig):
        super().__init__(config)
        norm_names = MODALITIES if config.separate_modality_norms else ("shared",)
        self.embeddings = AVViTEmbeddings(config)
        depth = config.num_hidden_layers
        # Linear stochastic-depth schedule (computed in Python: models may be built on the meta device).
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList(
            [
                AVViTLayer(
                    config,
                    config.hidden_size,
                    config.num_attention_heads,
                    config.intermediate_size,
                    norm_names,
                    rates[i],
                )
                for i in range(config.num_hidden_layers)
            ]
        )
        self.norm = ModalityLayerNorm(config.hidden_size, norm_names, config.layer_norm_eps)
        self.post_init()

    def forward(
        self,
        audio: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        has_audio: torch.Tensor | None = None,
        has_video: torch.Tensor | None = None,
        audio_mask: ModalityMask | None = None,
        video_mask: ModalityMask | None = None,
        output_hidden_states: bool | None = None,
        output_layers: Sequence[int] | None = None,
    ) -> AVViTModelOutput:
        """Embed the given modalities, keep the visible tokens of `audio_mask` / `video_mask` (None = all),
        run the shared blocks. `output_layers`: layer indices (negative from the end) whose outputs
        are returned in `intermediate_hidden_states`."""
        return self.forward_tokens(
            audio_tokens=self.embeddings.embed_audio(audio) if audio is not None else None,
            video_tokens=self.embeddings.embed_video(video) if video is not None else None,
            has_audio=has_audio,
            has_video=has_video,
            audio_mask=audio_mask,
            video_mask=video_mask,
            output_hidden_states=output_hidden_states,
            output_layers=output_layers,
        )

    def forward_features(self, inputs: AVInputs, output_layers: Sequence[int] | None = None) -> AVViTModelOutput:
        """The encoder on one `AVInputs` batch (timm's features API): the joint sequence of the
        modalities the batch holds, each sample attending to its own present ones; the outputs of
        `output_layers` in `intermediate_hidden_states`."""
        return self(
            audio=inputs.audio,
            video=inputs.video,
            has_audio=inputs.has_audio if inputs.audio is not None else None,
            has_video=inputs.has_video if inputs.video is not None else None,
            output_layers=output_layers,
        )

    def forward_tokens(
        self,
        audio_tokens: torch.Tensor | None = None,
        video_tokens: torch.Tensor | None = None,
        has_audio: torch.Tensor | None = None,
        has_video: torch.Tensor | None = None,
        audio_mask: ModalityMask | None = None,
        video_mask: ModalityMask | None = None,
        output_hidden_states: bool | None = None,
        output_layers: Sequence[int] | None = None,
    ) -> AVViTModelOutput:
        """The encoder on already embedded tokens (`embeddings.embed_audio` / `embed_video`, [B, L, D]):
        lets pretraining embed once and encode several masked views."""
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        parts: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []  # (modality, tokens, real-token mask)
        for name, tokens, present, mask in (
            ("audio", audio_tokens, has_audio, audio_mask),
            ("video", video_tokens, has_video, video_mask),
        ):
            if tokens is None:
                continue
            tokens, valid = self._visible_tokens(tokens, mask)  # (B, Lk, D), (B, Lk) | None
            batch = tokens.shape[0]
            if self.config.use_cls_token:
                cls = self.embeddings.cls_token(name).to(tokens.dtype).expand(batch, -1, -1)  # (B, 1, D)
                tokens = torch.cat([cls, tokens], dim=1)
                if valid is not None:
                    valid = F.pad(valid, (1, 0), value=True)
            if present is not None:
                present = present.to(device=tokens.device, dtype=torch.bool)[:, None]  # (B, 1)
                valid = present.expand(batch, tokens.shape[1]) if valid is None else valid & present
            parts.append((name, tokens, valid))
        if not parts:
            raise ValueError("AVViTModel needs audio, video or both")

        batch = parts[0][1].shape[0]
        device = parts[0][1].device
        segments: Segments = tuple((name, tokens.shape[1]) for name, tokens, _ in parts)
        hidden = torch.cat([tokens for _, tokens, _ in parts], dim=1) if len(parts) > 1 else parts[0][1]  # (B, N, D)
        hidden = self.embeddings.dropout(hidden)
        valids = [
            valid if valid is not None else torch.ones(batch, tokens.shape[1], dtype=torch.bool, device=device)
            for _, tokens, valid in parts
        ]
        padded = any(valid is not None for _, _, valid in parts)
        attention_mask = key_padding_mask(valids) if padded else None  # (B, 1, 1, N) | None

        n_layers = len(self.layers)
        wanted = sorted({i % n_layers for i in output_layers}) if output_layers else []
        all_hidden: tuple[torch.Tensor, ...] | None = (hidden,) if output_hidden_states else None
        chosen: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, attention_mask=attention_mask, segments=segments)
            if all_hidden is not None:
                all_hidden = all_hidden + (hidden,)
            if i in wanted:
                chosen.append(hidden)
        hidden = self.norm(hidden, segments)

        out = AVViTModelOutput(
            last_hidden_state=hidden,
            hidden_states=all_hidden,
            intermediate_hidden_states=tuple(chosen) if wanted else None,
        )
        pooled_sum = torch.zeros(batch, hidden.shape[-1], device=device, dtype=hidden.dtype)
        n_present = torch.zeros(batch, 1, device=device, dtype=hidden.dtype)
        pieces = hidden.split([length for _, length in segments], dim=1)
        for (name, _), piece, valid in zip(segments, pieces, valids, strict=True):
            pooled = self.pool_segment(piece, valid)  # (B, D)
            present = valid.any(dim=1, keepdim=True).to(hidden.dtype)  # (B, 1)
            pooled_sum = pooled_sum + pooled * present
            n_present = n_present + present
            out[f"{name}_last_hidden_state"] = piece
            out[f"{name}_token_mask"] = valid
            out[f"{name}_embeds"] = pooled
        out["fused_embeds"] = pooled_sum / n_present.clamp(min=1.0)
        return out

    def _visible_tokens(
        self, tokens: torch.Tensor, mask: ModalityMask | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, L, D] -> visible tokens [B, Lk, D] and their real-slot mask [B, Lk] (None = all real).

        Padding slots are set to zero: their gathered index points at a masked token, whose content
        must not reach the encoder even as a masked key (0 x NaN is NaN)."""
        if mask is None:
            return tokens, None
        ids = mask.ids_keep.to(tokens.device)  # (B, Lk)
        visible = torch.gather(tokens, 1, ids[..., None].expand(-1, -1, tokens.shape[-1]))  # (B, Lk, D)
        valid = mask.keep_valid
        if valid is not None:
            valid = valid.to(tokens.device)
            visible = torch.where(valid[..., None], visible, torch.zeros((), dtype=visible.dtype, device=visible.device))
        return visible, valid

    def pool_segment(self, piece: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, L, D] segment, [B, L] real tokens -> [B, D] (CLS output or mean of real tokens; 0 if none)."""
        if self.config.use_cls_token:
            return piece[:, 0] * valid[:, :1].to(piece.dtype)
        return masked_mean(piece, valid)

    def patch_mean(self, out: AVViTModelOutput, name: str) -> torch.Tensor:
        """[B, D] mean of modality `name`'s real patch outputs in `out`, never its CLS output (what the
        segment contrast of pretraining compares); 0 for a sample without any."""
        piece, valid = out[f"{name}_last_hidden_state"], out[f"{name}_token_mask"]
        if self.config.use_cls_token:
            piece, valid = piece[:, 1:], valid[:, 1:]
        return masked_mean(piece, valid)

    # ---- convenience features API ----

    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, T, F] -> pooled audio embedding [B, D] (audio-only mode)."""
        return self(audio=audio).audio_embeds

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[B, V, 3, H, W] -> pooled video embedding [B, D] (video-only mode)."""
        return self(video=video).video_embeds

    def encode_audio_visual(
        self,
        audio: torch.Tensor,
        video: torch.Tensor,
        has_audio: torch.Tensor | None = None,
        has_video: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Joint sequence -> fused embedding [B, D] (mean of the pooled modalities each sample has)."""
        return self(audio=audio, video=video, has_audio=has_audio, has_video=has_video).fused_embeds


class AVViTDecoder(nn.Module):
    """Light masked-data-modeling decoder shared by both modalities (CAV-MAE): visible latents are
    projected, mask tokens fill the masked positions, per-modality decoder positions and modality
    embeddings are added, shared blocks run on the joint sequence, per-modality heads predict pixels."""

    def __init__(self, config: AVViTConfig):
        super().__init__()
        dim = config.decoder_hidden_size
        self.embed = nn.Linear(config.hidden_size, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.positions = ModalityPositions(config, dim)
        self.layers = nn.ModuleList(
            [
                AVViTLayer(config, dim, config.decoder_num_attention_heads, config.decoder_intermediate_size, ("shared",))
                for _ in range(config.decoder_num_hidden_layers)
            ]
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.audio_head = nn.Linear(dim, config.audio_patch_size**2)
        self.video_head = nn.Linear(dim, 3 * config.video_patch_size**2)

    def _unshuffle(self, latent: torch.Tensor, mask: ModalityMask) -> torch.Tensor:
        """[B, Lk, Dd] visible latents -> [B, L, Dd] with mask tokens at masked positions."""
        batch, _, dim = latent.shape
        length = mask.num_tokens
        index = mask.ids_keep.to(latent.device)  # (B, Lk)
        if mask.keep_valid is not None:
            # Padding slots write to a spare position L that is cut off afterwards.
            index = torch.where(mask.keep_valid.to(latent.device), index, length)
        full = self.mask_token.to(latent.dtype).expand(batch, length + 1, dim)  # (B, L+1, Dd)
        full = full.scatter(1, index[..., None].expand(-1, -1, dim), latent)
        return full[:, :length]  # (B, L, Dd)

    def forward(
        self,
        audio_latent: torch.Tensor | None = None,
        audio_mask: ModalityMask | None = None,
        audio_grid: tuple[int, int] | None = None,
        video_latent: torch.Tensor | None = None,
        video_mask: ModalityMask | None = None,
        video_grid: tuple[int, int, int] | None = None,
        has_audio: torch.Tensor | None = None,
        has_video: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Latents of visible tokens [B, Lk_m, D] (no CLS) -> predicted patches: audio [B, La, p*p],
        video [B, Lv, 3*p*p]."""
        parts: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        if audio_latent is not None:
            x = self._unshuffle(self.embed(audio_latent), audio_mask)  # (B, La, Dd)
            parts.append(("audio", x + self.positions.audio_embedding(audio_grid), has_audio))
        if video_latent is not None:
            frames, h, w = video_grid
            x = self._unshuffle(self.embed(video_latent), video_mask)  # (B, Lv, Dd)
            parts.append(("video", x + self.positions.video_embedding(frames, (h, w)), has_video))
        batch = parts[0][1].shape[0]
        segments: Segments = tuple((name, x.shape[1]) for name, x, _ in parts)
        hidden = torch.cat([x for _, x, _ in parts], dim=1) if len(parts) > 1 else parts[0][1]  # (B, N, Dd)
        attention_mask = None
        if any(present is not None for _, _, present in parts):
            valids = [
                (present.to(device=x.device, dtype=torch.bool)[:, None] if present is not None
                 else torch.ones(batch, 1, dtype=torch.bool, device=x.device)).expand(batch, x.shape[1])
                for _, x, present in parts
            ]
            attention_mask = key_padding_mask(valids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=attention_mask, segments=segments)
        hidden = self.norm(hidden)
        preds = dict(zip([name for name, _ in segments], hidden.split([n for _, n in segments], dim=1), strict=True))
        pred_audio = self.audio_head(preds["audio"]) if "audio" in preds else None
        pred_video = self.video_head(preds["video"]) if "video" in preds else None
        return pred_audio, pred_video


class AVViTForPretraining(AVViTPreTrainedModel):
    """Encoder + reconstruction decoder, with the pretraining objective that runs on them.

    forward(audio, video, has_audio, has_video, process_group=None) -> AVViTForPretrainingOutput
      audio: [B, T, F]; video: [B, V, 3, H, W]; has_*: [B] bool (absent modalities zero-filled).
      Pass None for a modality only when the whole run has none of it. `process_group`: the
      data-parallel group the contrastive losses gather across (None: one process).

    The masking and loss sections are constructor arguments, not part of the `AVViTConfig`: they
    describe the training run (its recipe holds them), and a release carries the encoder only.
    """

    def __init__(self, config: AVViTConfig, masking: MaskingConfig | None = None, loss: LossConfig | None = None):
        super().__init__(config)
        self.avvit = AVViTModel(config)
        self.decoder = AVViTDecoder(config)
        self.objective = PretrainingObjective(config.hidden_size, masking, loss)
        self.post_init()

    def forward(
        self,
        audio: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        has_audio: torch.Tensor | None = None,
        has_video: torch.Tensor | None = None,
        process_group=None,
    ) -> AVViTForPretrainingOutput:
        inputs = AVInputs.of(audio, video, has_audio, has_video)
        return self.objective(self.avvit, self.decoder, inputs, process_group)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the objective was its own module hold its parameters at the
        # top level ("audio_projection.*", "logit_scale"): read them under "objective.".
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if rest == "logit_scale" or rest.split(".", 1)[0] in _OBJECTIVE_HEADS:
                state_dict[f"{prefix}objective.{rest}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


_OBJECTIVE_HEADS = ("audio_projection", "video_projection", "audio_segment_projection", "video_segment_projection")


def masked_mean(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, L, D] tokens, [B, L] bool (True = real) -> [B, D] mean of the real tokens; 0 for a row without any."""
    weight = valid.to(tokens.dtype)[..., None]  # (B, L, 1)
    return (tokens * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)


__all__ = [
    "AVInputs",
    "AVViTDecoder",
    "AVViTEmbeddings",
    "AVViTForPretraining",
    "AVViTForPretrainingOutput",
    "AVViTLayer",
    "AVViTModel",
    "AVViTModelOutput",
    "AVViTPreTrainedModel",
    "ContrastiveProjection",
    "GridPositionEmbedding",
    "eager_attention_forward",
    "ensure_attention_implementation",
    "key_padding_mask",
    "PretrainingObjective",
    "masked_mean",
    "resize_position_embedding",
    "sincos_position_embedding",
]


# Loading a released directory with transformers' Auto classes needs the "avvit" model type
# registered; importing this module does it.
AutoConfig.register(AVViTConfig.model_type, AVViTConfig, exist_ok=True)
AutoModel.register(AVViTConfig, AVViTModel, exist_ok=True)
AutoModelForPreTraining.register(AVViTConfig, AVViTForPretraining, exist_ok=True)
