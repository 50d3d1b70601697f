"""`AVViTConfig`: the Hugging Face configuration of the shared audio-visual ViT (model_type "avvit").

It describes the architecture only (widths, depths, patch geometry, the default input sizes the
positional embeddings are stored for). The pretraining objective's masking and loss sections belong to
the run's recipe and are passed to `AVViTForPretraining` apart, so a release's `config.json` holds
none of them.

Input geometry (all sizes in patches unless stated):
- audio: fbank `[B, T, F]` is read as a one-channel image `[B, 1, F, T]` (height = mel bins, width =
  time, as AST / CAV-MAE). Patches `p x p` with strides (`audio_freq_stride`, `audio_time_stride`);
  `(F - p)` must be a multiple of the frequency stride. In time the model pads `T` with zeros at the end
  up to the next length the time stride covers exactly: `nt = ceil((T - p) / s_t) + 1`, `T_pad =
  (nt - 1) * s_t + p` (2 s = 200 frames -> 208 frames, 13 time patches). Tokens are frequency-major:
  token `f * nt + t`.
- video: `[B, V, 3, H, W]` face frames, `p x p` patches per frame, tokens frame-major: token
  `v * (h * w) + y * w + x`, positional embedding = 2-D spatial + 1-D frame embedding.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

POS_EMBED_TYPES = ("sincos", "learned")


class AVViTConfig(PretrainedConfig):
    r"""
    Args:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the shared ViT.
        hidden_act: MLP activation ("gelu").
        hidden_dropout_prob, attention_probs_dropout_prob, drop_path_rate: regularization
            (drop path grows linearly with depth, as in timm / MAE fine-tuning).
        layer_norm_eps: LayerNorm epsilon (1e-6 as MAE / timm ViT).
        qkv_bias: bias in the fused query/key/value projection.
        initializer_range: std of the truncated-normal init of tokens and learned embeddings.
        separate_modality_norms: one LayerNorm per modality in every block (LN1, LN2) and at the end,
            as AVSiam; False shares them.
        pos_embed_type: "sincos" (fixed 2-D sin-cos, recomputed for other input sizes) or "learned"
            (interpolated to other sizes: bicubic in 2-D, linear for frames).
        use_cls_token: one CLS token per modality at the start of its segment; pooled embeddings are
            then the CLS outputs, else the mean of the real tokens (default).
        audio_num_mel_bins, audio_num_frames: the fbank size the audio positional embedding is stored
            for (other lengths are handled at run time).
        audio_patch_size, audio_freq_stride, audio_time_stride: audio patch geometry (stride < patch
            gives overlapping patches, as AST).
        video_image_size, video_num_frames, video_patch_size: face frames.
        decoder_*: the light masked-data-modeling decoder of `AVViTForPretraining` (CAV-MAE: 512 x 8).
    """

    model_type = "avvit"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    initializer_range: float = 0.02
    separate_modality_norms: bool = True
    pos_embed_type: str = "sincos"
    use_cls_token: bool = False

    audio_num_mel_bins: int = 128
    audio_num_frames: int = 200
    audio_patch_size: int = 16
    audio_freq_stride: int = 16
    audio_time_stride: int = 16

    video_image_size: int = 224
    video_num_frames: int = 1
    video_patch_size: int = 16

    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_num_attention_heads: int = 16
    decoder_intermediate_size: int = 2048

    def __post_init__(self, **kwargs):
        self._check()
        super().__post_init__(**kwargs)

    def _check(self) -> None:
        """Reject geometry the model cannot run (errors name the field and the fix)."""
        for width, heads, what in (
            (self.hidden_size, self.num_attention_heads, "hidden_size / num_attention_heads"),
            (self.decoder_hidden_size, self.decoder_num_attention_heads, "decoder_hidden_size / decoder_num_attention_heads"),
        ):
            if width % heads:
                raise ValueError(f"AVViTConfig: {what} = {width} / {heads} is not an integer head size")
            if width % 4:
                # The 2-D sin-cos code gives a quarter of the channels to each of sin/cos x row/column.
                raise ValueError(f"AVViTConfig: width {width} ({what}) must be a multiple of 4")
        if self.pos_embed_type not in POS_EMBED_TYPES:
            raise ValueError(f"AVViTConfig: pos_embed_type {self.pos_embed_type!r} is not one of {POS_EMBED_TYPES}")
        p = self.audio_patch_size
        if not (1 <= self.audio_freq_stride <= p and 1 <= self.audio_time_stride <= p):
            raise ValueError(f"AVViTConfig: audio strides must be in [1, audio_patch_size={p}] (no gaps between patches)")
        if self.audio_num_mel_bins < p or (self.audio_num_mel_bins - p) % self.audio_freq_stride:
            raise ValueError(
                f"AVViTConfig: audio_num_mel_bins={self.audio_num_mel_bins} does not tile with patch {p} and "
                f"frequency stride {self.audio_freq_stride}: (mel bins - patch) must be a non-negative multiple of the stride"
            )
        if self.audio_num_frames < 1:
            raise ValueError("AVViTConfig: audio_num_frames must be >= 1")
        if self.video_image_size % self.video_patch_size:
            raise ValueError(
                f"AVViTConfig: video_image_size={self.video_image_size} is not a multiple of video_patch_size={self.video_patch_size}"
            )
        if self.video_num_frames < 1:
            raise ValueError("AVViTConfig: video_num_frames must be >= 1")

    # ---- geometry helpers (pure functions of the config) ----

    def audio_grid(self, num_frames: int | None = None) -> tuple[int, int]:
        """(frequency patches, time patches) for `num_frames` fbank frames (default: the stored length)."""
        frames = self.audio_num_frames if num_frames is None else num_frames
        p = self.audio_patch_size
        n_freq = (self.audio_num_mel_bins - p) // self.audio_freq_stride + 1
        n_time = max(0, math.ceil((frames - p) / self.audio_time_stride)) + 1
        return n_freq, n_time

    def audio_padded_frames(self, num_frames: int) -> int:
        """Frames after the model's zero padding at the end: `(nt - 1) * s_t + p` (>= num_frames)."""
        _, n_time = self.audio_grid(num_frames)
        return max(num_frames, (n_time - 1) * self.audio_time_stride + self.audio_patch_size)

    def video_grid(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """(rows, columns) of patches per frame."""
        if image_size is None:
            image_size = self.video_image_size
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return h // self.video_patch_size, w // self.video_patch_size

    def num_audio_patches(self, num_frames: int | None = None) -> int:
        n_freq, n_time = self.audio_grid(num_frames)
        return n_freq * n_time

    def num_video_patches(self, num_frames: int | None = None, image_size: int | None = None) -> int:
        h, w = self.video_grid(image_size)
        return (self.video_num_frames if num_frames is None else num_frames) * h * w


__all__ = ["AVViTConfig", "POS_EMBED_TYPES"]
