"""Tiny real diffusers pipelines written to disk for the distillation tests (random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wadi_analysis.examples import tiny_sd15_config
from wadi_distill.embedded.tokenizer import byte_characters


def tiny_clip_tokenizer(folder: Path):
    """A CLIPTokenizer over single characters (byte-level vocabulary, no merges): real code, tiny files."""
    from transformers import CLIPTokenizer

    characters = byte_characters()
    vocab = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_sd_pipeline(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder: SD1.5-layout U-Net, 2-layer CLIP text encoder, 1-level VAE."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(folder.parent / f".{folder.name}-tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=UNet2DConditionModel(**tiny_sd15_config()), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def tiny_sdxl_pipeline(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusionXLPipeline folder: SDXL-layout U-Net (text_time conditioning), two CLIP encoders."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(folder.parent / f".{folder.name}-tokenizer")

    def encoder_config(hidden):
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                              projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(encoder_config(32)),
                                     text_encoder_2=CLIPTextModelWithProjection(encoder_config(32)),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


def tiny_pixart_pipeline(folder: Path, seed: int = 0) -> Path:
    """A PixArtAlphaPipeline folder: 2-block PixArt transformer (learned sigma), 2-layer T5 encoder with a
    word-level tokenizer built in code."""
    from diffusers import AutoencoderKL, DDPMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(seed)
    words = ["<pad>", "</s>", "<unk>"] + "a an the photo of sneaker bag shirt dress coat boot sandal".split()
    # T5 tokenizers are Unigram models; whole words score higher than anything else.
    backend = Tokenizer(models.Unigram([(w, 0.0 if i < 3 else -1.0) for i, w in enumerate(words)], unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=120)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=2, pad_token_id=0, eos_token_id=1))
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, caption_channels=32, sample_size=8, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    scheduler = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)
    PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler).save_pretrained(folder)
    return folder


def tiny_sd3_pipeline(folder: Path, seed: int = 0, shift: float = 3.0) -> Path:
    """A StableDiffusion3Pipeline folder: 2-layer SD3 transformer (joint attention), 16-channel VAE, two CLIP
    encoders with projections (pooled 2 x 32 = 64) and a 2-layer T5 encoder, FlowMatchEulerDiscreteScheduler."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(folder.parent / f".{folder.name}-tokenizer")

    def clip_encoder():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))

    words = ["<pad>", "</s>", "<unk>"] + "a an the photo of sneaker bag shirt dress coat boot sandal".split()
    backend = Tokenizer(models.Unigram([(w, 0.0 if i < 3 else -1.0) for i, w in enumerate(words)], unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    t5_tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   extra_ids=0, model_max_length=77)
    # T5 width = the CLIP widths joined (32 + 32): encode_prompt concatenates CLIP and T5 along the sequence
    t5 = T5EncoderModel(T5Config(vocab_size=len(words), d_model=64, d_kv=8, d_ff=128, num_layers=2, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
        pos_embed_max_size=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                        latent_channels=16, norm_num_groups=8, sample_size=16, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                             text_encoder=clip_encoder(), tokenizer=tokenizer,
                             text_encoder_2=clip_encoder(), tokenizer_2=tokenizer,
                             text_encoder_3=t5, tokenizer_3=t5_tokenizer).save_pretrained(folder)
    return folder


def tiny_flux_pipeline(folder: Path, seed: int = 0, shift: float = 3.0, guidance_embeds: bool = True) -> Path:
    """A FluxPipeline folder in FLUX.1-dev's layout: a FluxTransformer2DModel (1 double and 1 single block, RoPE
    axes 2 + 2 + 4 = the head width) with the guidance embedding of a guidance-distilled model, 16-channel VAE with
    a shift factor (latents packed 2 x 2 into 64 channels), a CLIP text encoder (pooled 32) and a 2-layer T5
    (width 32 = joint_attention_dim), tokenizers built in code; FlowMatchEulerDiscreteScheduler with a static
    ``shift`` (FLUX.1-dev's own shifts with the resolution, which the teacher loader refuses)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(folder.parent / f".{folder.name}-tokenizer")
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    words = ["<pad>", "</s>", "<unk>"] + "a an the photo of sneaker bag shirt dress coat boot sandal".split()
    backend = Tokenizer(models.Unigram([(w, 0.0 if i < 3 else -1.0) for i, w in enumerate(words)], unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    t5_tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   extra_ids=0, model_max_length=512)
    t5 = T5EncoderModel(T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                        latent_channels=16, norm_num_groups=8, sample_size=16, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                 text_encoder_2=t5, tokenizer_2=t5_tokenizer).save_pretrained(folder)
    return folder


def tiny_sana_pipeline(folder: Path, seed: int = 0, flow_shift: float = 3.0) -> Path:
    """A SanaPipeline folder in SANA 1600M's layout: a 2-block SanaTransformer2DModel (linear self-attention,
    cross-attention, GLUMBConv; sample_size 16, one of the pipeline's resolution bins), a 2-layer Gemma2Model text
    encoder (width 32 = caption_channels) with a word-level tokenizer built in code, a 2-level AutoencoderDC
    (8 latent channels, scale factor 2) and the scheduler SANA ships: DPMSolverMultistepScheduler with flow
    sigmas, flow prediction and ``flow_shift``."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

    torch.manual_seed(seed)
    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + "a an the photo of sneaker bag shirt dress coat boot sandal".split()
    # Unigram over whole words (the complex human instruction is mostly <unk>: real code, tiny files)
    backend = Tokenizer(models.Unigram([(w, 0.0 if i < 4 else -1.0) for i, w in enumerate(words)], unk_id=3))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = GemmaTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", add_bos_token=True, add_eos_token=False)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
        bos_token_id=2))
    transformer = SanaTransformer2DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        sample_size=16, patch_size=1)
    vae = AutoencoderDC(in_channels=3, latent_channels=8, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16),
                        decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), downsample_block_type="conv",
                        upsample_block_type="interpolate", scaling_factor=0.41407)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=flow_shift, algorithm_type="dpmsolver++",
                                            solver_order=2, final_sigmas_type="zero")
    SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                 scheduler=scheduler).save_pretrained(folder)
    return folder
