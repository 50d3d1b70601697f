"""Run-config sections of the pretraining model: `ModelConfig`, `MaskingConfig`, `LossConfig`.

Each is a strict `Section` (unknown keys and impossible values fail at load time with the key path)
and `build_model(model, masking, loss)` turns the three into an `AVViTForPretraining`.

Defaults and where they come from:
- model: ViT-B/16 (`avvit_base_patch16`), SDPA attention, 2 s of 128-bin fbank (200 frames, padded by
  the model to 208 = 13 time patches), one 224x224 face, per-modality LayerNorms (AVSiam), fixed
  sin-cos positions (MAE), mean pooling.
- masking: contrastive view as AVSiam (ratios {0, .2, .4, .6, .8} over sub-batches, audio in 2x2
  time-frequency blocks, video random); reconstruction view as CAV-MAE (0.75 per modality, random
  patches). AV-HuBERT's asymmetric 0.8 audio / 0.3 video is `reconstruction: {audio_ratios: [0.8],
  video_ratios: [0.3]}`.
- loss: CAV-MAE's 1.0 x reconstruction + 0.01 x contrastive, temperature 0.05 (fixed), per-patch
  normalized targets.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from avssl.config import ConfigError, Section

from .masking import AudioMaskMode, VideoMaskMode
from .registry import ARCHITECTURES

Ratio = Annotated[float, Field(ge=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]


class ModelConfig(Section):
    """The network: an architecture from the registry plus input geometry and switches."""

    arch: str = Field("avvit_base_patch16", description="architecture from the registry (pretrain/registry.py): avvit_{tiny,small,base,large}_patch16")
    attn_implementation: Literal["eager", "sdpa", "triton"] = Field(
        "sdpa", description="attention kernel: eager (reference), sdpa (PyTorch) or triton (avssl.kernels, falls back to sdpa without Triton)"
    )
    audio_num_mel_bins: PositiveInt = Field(128, description="fbank bins per frame; in a recipe: features.num_mel_bins unless set")
    audio_num_frames: PositiveInt = Field(
        200,
        description="fbank frames the positional embedding is stored for (10 ms shift, 25 ms window: 198 frames = 2 s); other lengths "
        "are padded to the patch grid with positions recomputed or interpolated; in a recipe: the frames of "
        "data.clip_seconds unless set",
    )
    audio_patch_size: PositiveInt = Field(16, description="side of an audio patch, in bins and frames")
    audio_freq_stride: PositiveInt = Field(16, description="patch stride along frequency; below the patch size patches overlap (AST: 10)")
    audio_time_stride: PositiveInt = Field(16, description="patch stride along time; below the patch size patches overlap")
    video_image_size: PositiveInt = Field(224, description="side of the face frames in pixels; in a recipe: features.image_size unless set")
    video_num_frames: PositiveInt = Field(1, description="face frames per clip; in a recipe: features.num_frames unless set")
    video_patch_size: PositiveInt = Field(16, description="side of an RGB patch in pixels")
    separate_modality_norms: bool = Field(True, description="one LayerNorm per modality in every block and at the end (AVSiam); false: shared")
    pos_embed_type: Literal["sincos", "learned"] = Field(
        "sincos", description="sincos: fixed 2-D sin-cos positions (MAE); learned: trained, interpolated to other grids"
    )
    use_cls_token: bool = Field(
        False, description="a CLS token per modality; its output is the pooled embedding, else the mean of the real tokens"
    )
    init_from: str | None = Field(
        None, description="Hugging Face ViT or ViT-MAE directory to initialize the shared backbone from; null: random init"
    )
    decoder_hidden_size: PositiveInt | None = Field(
        None, description="width of the reconstruction decoder; null: the architecture's (base: 512)"
    )
    decoder_num_hidden_layers: PositiveInt | None = Field(None, description="decoder layers; null: the architecture's (base: 8)")
    decoder_num_attention_heads: PositiveInt | None = Field(None, description="decoder heads; null: the architecture's (base: 16)")
    hidden_dropout: Probability = Field(0.0, description="dropout on the embeddings and on each attention and MLP output")
    attention_dropout: Probability = Field(0.0, description="dropout on the attention weights")
    drop_path_rate: Probability = Field(0.0, description="stochastic depth of the last layer, rising linearly from 0 at the first")
    gradient_checkpointing: bool = Field(False, description="recompute encoder layer activations in backward to save memory")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {value!r}; choose one of {', '.join(ARCHITECTURES)}")
        return value

    @model_validator(mode="after")
    def _geometry(self) -> ModelConfig:
        p = self.audio_patch_size
        if self.audio_freq_stride > p or self.audio_time_stride > p:
            raise ValueError(f"audio strides must not exceed audio_patch_size={p} (patches would leave gaps)")
        if self.audio_num_mel_bins < p or (self.audio_num_mel_bins - p) % self.audio_freq_stride:
            raise ValueError(
                f"audio_num_mel_bins={self.audio_num_mel_bins} does not tile: (mel bins - audio_patch_size={p}) must be "
                f"a non-negative multiple of audio_freq_stride={self.audio_freq_stride} (e.g. 128 bins with 16/16 or 16/8)"
            )
        if self.video_image_size % self.video_patch_size:
            raise ValueError(
                f"video_image_size={self.video_image_size} must be a multiple of video_patch_size={self.video_patch_size}"
            )
        if self.init_from is not None and self.pos_embed_type != "learned":
            raise ValueError(
                "init_from copies the image ViT's positional embedding (interpolated to the audio and video grids): "
                "set pos_embed_type: learned"
            )
        width = self.decoder_hidden_size or ARCHITECTURES[self.arch].decoder_hidden_size
        heads = self.decoder_num_attention_heads or ARCHITECTURES[self.arch].decoder_num_attention_heads
        if width % heads or width % 4:
            raise ValueError(
                f"decoder width {width} must be a multiple of 4 and of the decoder head count {heads}"
            )
        return self


class ViewMaskingConfig(Section):
    """Masking of one view: ratios per modality (several = contrastive sub-batches) and the mode."""

    audio_ratios: list[Ratio] = Field(
        min_length=1, description="share of audio patches masked; several ratios go to equal sub-batches, one each"
    )
    video_ratios: list[Ratio] = Field(min_length=1, description="share of video patches masked, as audio_ratios")
    audio_mode: AudioMaskMode = Field(
        "unstructured",
        description="unit masked whole: unstructured (a patch), time (a time column), frequency (a frequency row) or "
        "tf_block (masking.audio_block_size patches)",
    )
    video_mode: VideoMaskMode = Field(
        "random", description="unit masked whole: random (a patch) or tube (one position in every frame, VideoMAE)"
    )


def _contrastive_default() -> ViewMaskingConfig:
    return ViewMaskingConfig(
        audio_ratios=[0.0, 0.2, 0.4, 0.6, 0.8],
        video_ratios=[0.0, 0.2, 0.4, 0.6, 0.8],
        audio_mode="tf_block",
        video_mode="random",
    )


def _reconstruction_default() -> ViewMaskingConfig:
    return ViewMaskingConfig(audio_ratios=[0.75], video_ratios=[0.75], audio_mode="unstructured", video_mode="random")


class MaskingConfig(Section):
    """Asymmetric masking: a light contrastive view and a heavy reconstruction view (see masking.py)."""

    contrastive: ViewMaskingConfig = Field(
        default_factory=_contrastive_default,
        description="the light view: each modality encoded alone for the contrasts (AVSiam's ratios)",
    )
    reconstruction: ViewMaskingConfig = Field(
        default_factory=_reconstruction_default,
        description="the heavy view: the joint audio-visual sequence for masked data modeling (CAV-MAE's 0.75)",
    )
    audio_block_size: list[PositiveInt] = Field(
        default_factory=lambda: [2, 2], min_length=2, max_length=2,
        description="block of the audio tf_block mode, in patches: (frequency, time)",
    )
    # With several contrastive ratios the samples keep different numbers of tokens; one padded batch
    # spends about a third of the view's encoder work on padding (ratios 0-0.8: 40 % of the slots).
    pack_contrastive: bool = Field(
        True,
        description="encode the contrastive view one masking ratio at a time, each sub-batch at its own length "
        "(no padding tokens); false: one batch padded to the longest (the reference, same losses up to rounding)",
    )

    @model_validator(mode="after")
    def _reconstruction_masks_something(self) -> MaskingConfig:
        view = self.reconstruction
        if min(view.audio_ratios + view.video_ratios) <= 0.0:
            raise ValueError("reconstruction ratios must be > 0: the reconstruction loss is computed on masked patches only")
        return self


class LossConfig(Section):
    """Weights of the objectives: loss = w_rec * (w_a * rec_audio + w_v * rec_video) + w_con * contrastive
    + w_seg * segment."""

    reconstruction_weight: Annotated[float, Field(ge=0.0)] = Field(1.0, description="w_rec: weight of masked data modeling")
    contrastive_weight: Annotated[float, Field(ge=0.0)] = Field(0.01, description="w_con: weight of the audio-visual contrast")
    audio_reconstruction_weight: Annotated[float, Field(ge=0.0)] = Field(1.0, description="w_a: weight of the audio reconstruction term")
    video_reconstruction_weight: Annotated[float, Field(ge=0.0)] = Field(1.0, description="w_v: weight of the video reconstruction term")
    temperature: Annotated[float, Field(gt=0.0, le=1.0)] = Field(0.05, description="temperature of the audio-visual contrast")
    learn_temperature: bool = Field(False, description="learn the AV contrast's 1/temperature, starting at 1/temperature")
    # Why a projection head: (1) it centres the pooled embeddings, whose cosines are 0.97 (audio) and
    # 0.87 (video) between unrelated clips at initialization, so the contrast trains from the first
    # steps instead of sitting at chance; (2) it takes the invariances the contrast asks for, so the
    # backbone's own features keep more of what the contrast does not need (SimCLR, section 4.2).
    projection: Literal["none", "mlp"] = Field(
        "none",
        description="none: the contrasts read the pooled embeddings (CAV-MAE, AVSiam); mlp: a head per modality, "
        "Linear-BatchNorm-GELU-Linear-BatchNorm without affine (SimCLR, MoCo v3), dropped at release",
    )
    projection_dim: Annotated[int, Field(ge=8)] = Field(256, description="output width of the projection heads")
    max_logit_scale: Annotated[float, Field(gt=1.0)] = Field(100.0, description="upper bound of the learned 1/temperature (CLIP's 100)")
    norm_pix_loss: bool = Field(True, description="per-patch normalized video targets (MAE's norm_pix_loss); false: raw pixels")
    # Measured on the synthetic corpus: a normalized 16x16 fbank patch is close to noise (1 - r^2 with
    # its time neighbour 0.85-0.97) and the audio reconstruction loss stays near 1, yet the demo's audio
    # embeddings verify speakers better than with raw targets (zero-shot audio EER 41.9 % vs 47.5 %,
    # AV 7.5 % vs 13.1 %; random backbone 48.8 %, 13.1 %): the contrastive branch then shapes the audio
    # encoder. Raw targets keep the level and band shape that context does predict (the loss falls
    # from 0.83 to 0.18), at the cost of those speaker cues. docs/model.md, "Reconstruction targets".
    audio_norm_pix_loss: bool = Field(
        True, description="per-patch normalized fbank targets (AudioMAE, CAV-MAE); false: raw fbank values"
    )
    # Only what holds for the whole clip (speaker, emotion, recording channel, a spoofing artefact)
    # tells two halves of one clip from two halves of another clip of the same speaker; what changes
    # within it (the syllables, the head's sway) does not. The halves are pooled as the mean of their
    # patch outputs, never a CLS output: with `model.use_cls_token` the CLS output stays the AV
    # contrast's (and the release's) embedding. With `projection: mlp` it has its own heads.
    segment_weight: Annotated[float, Field(ge=0.0)] = Field(
        0.0,
        description="w_seg: segment contrast per modality (COLA, BYOL-A): a clip's first and second half in time, "
        "each encoded alone, are a positive pair against the other clips' halves; 0: off",
    )
    segment_temperature: Annotated[float, Field(gt=0.0, le=1.0)] = Field(0.1, description="temperature of the segment contrast")
    # On a corpus with deepfakes the nearest negative of a clip can be its own spoof or source, which
    # differ only by the artefacts; plain InfoNCE lets the other negatives drown that pair out.
    hard_negative_beta: Annotated[float, Field(ge=0.0)] = Field(
        0.0,
        description="hard negatives in both contrasts (Robinson et al., ICLR 2021): each anchor's negatives weighted "
        "by exp(beta x cosine), normalized to mean 1; 0: plain InfoNCE",
    )

    @model_validator(mode="after")
    def _something_to_learn(self) -> LossConfig:
        if self.reconstruction_weight == 0.0 and self.contrastive_weight == 0.0 and self.segment_weight == 0.0:
            raise ValueError("reconstruction_weight, contrastive_weight and segment_weight are all 0: nothing to train")
        if self.temperature < 1.0 / self.max_logit_scale:
            raise ValueError(f"temperature {self.temperature} is below 1 / max_logit_scale = {1.0 / self.max_logit_scale}")
        return self


def avvit_config_from_sections(model: ModelConfig):
    """The `AVViTConfig` that `model` describes (architecture only)."""
    from .registry import avvit_config

    overrides = {
        "audio_num_mel_bins": model.audio_num_mel_bins,
        "audio_num_frames": model.audio_num_frames,
        "audio_patch_size": model.audio_patch_size,
        "audio_freq_stride": model.audio_freq_stride,
        "audio_time_stride": model.audio_time_stride,
        "video_image_size": model.video_image_size,
        "video_num_frames": model.video_num_frames,
        "video_patch_size": model.video_patch_size,
        "separate_modality_norms": model.separate_modality_norms,
        "pos_embed_type": model.pos_embed_type,
        "use_cls_token": model.use_cls_token,
        "hidden_dropout_prob": model.hidden_dropout,
        "attention_probs_dropout_prob": model.attention_dropout,
        "drop_path_rate": model.drop_path_rate,
        "attn_implementation": model.attn_implementation,
    }
    if model.decoder_hidden_size is not None:
        overrides["decoder_hidden_size"] = model.decoder_hidden_size
        overrides["decoder_intermediate_size"] = 4 * model.decoder_hidden_size
    if model.decoder_num_hidden_layers is not None:
        overrides["decoder_num_hidden_layers"] = model.decoder_num_hidden_layers
    if model.decoder_num_attention_heads is not None:
        overrides["decoder_num_attention_heads"] = model.decoder_num_attention_heads
    return avvit_config(model.arch, **overrides)


def build_model(model: ModelConfig, masking: MaskingConfig | None = None, loss: LossConfig | None = None):
    """`AVViTForPretraining` from the three sections: registry size, attention kernel, optional
    initialization from an image ViT, gradient checkpointing. Raises ConfigError when a mask ratio
    leaves nothing to reconstruct for the configured input size."""
    # Imported here: modeling imports this module for MaskingConfig / LossConfig.
    from .init_from_vit import load_vit_weights
    from .masking import num_masked
    from .modeling import AVViTForPretraining, enable_activation_checkpointing, ensure_attention_implementation

    masking = masking or MaskingConfig()
    loss = loss or LossConfig()
    config = avvit_config_from_sections(model)
    for modality, length, ratios in (
        ("audio", config.num_audio_patches(), masking.reconstruction.audio_ratios),
        ("video", config.num_video_patches(), masking.reconstruction.video_ratios),
    ):
        for ratio in ratios:
            if loss.reconstruction_weight > 0 and num_masked(ratio, length) == 0:
                raise ConfigError(
                    f"masking.reconstruction.{modality}_ratios: {ratio} masks 0 of the {length} {modality} patches; "
                    "raise the ratio or the input size"
                )
    ensure_attention_implementation(model.attn_implementation)
    net = AVViTForPretraining(config, masking, loss)
    if model.init_from is not None:
        load_vit_weights(net.avvit, model.init_from)
    if model.gradient_checkpointing:
        enable_activation_checkpointing(net)
    return net


__all__ = [
    "LossConfig",
    "MaskingConfig",
    "ModelConfig",
    "ViewMaskingConfig",
    "avvit_config_from_sections",
    "build_model",
]
