"""Diffusers weights to the original Stable Diffusion single-file layout, the one the common
SD UIs load: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and the text
encoders: ``cond_stage_model.transformer.*`` (SD 1.x, CLIP), ``cond_stage_model.model.*``
(SD 2.x, OpenCLIP), ``conditioner.embedders.0.transformer.*`` and
``conditioner.embedders.1.model.*`` (SDXL, CLIP and OpenCLIP with its projection).

The key maps follow diffusers' ``convert_diffusers_to_original_stable_diffusion.py`` and
``convert_diffusers_to_original_sdxl.py``, generalised to any number of blocks and layers per
block, and are the inverse of what ``from_single_file`` reads
(``diffusers.loaders.single_file_utils``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dandelion_p2p.worker.model import Components

UNET_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
]
UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
VAE_ATTENTION = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]


def unet_layer_map(config: Any) -> list[tuple[str, str]]:
    """(original prefix, diffusers prefix) for every block of a UNet with ``config``."""
    lpb = config.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError("single-file export needs one layers_per_block for every block")
    n = len(config.block_out_channels)
    pairs = []
    for i in range(n):
        down_attn = "CrossAttn" in config.down_block_types[i]
        up_attn = "CrossAttn" in config.up_block_types[i]
        for j in range(lpb):
            block = (lpb + 1) * i + j + 1
            pairs.append((f"input_blocks.{block}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn:
                pairs.append((f"input_blocks.{block}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(lpb + 1):
            pairs.append((f"output_blocks.{(lpb + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn:
                pairs.append((f"output_blocks.{(lpb + 1) * i + j}.1.",
                              f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            pairs.append((f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.",
                          f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{(lpb + 1) * i + lpb}.{2 if up_attn else 1}.",
                          f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return pairs


def _replace_prefix(key: str, pairs: list[tuple[str, str]]) -> str:
    for original, diffusers in pairs:
        if key.startswith(diffusers):
            return original + key[len(diffusers):]
    return key


def convert_unet(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    layers = unet_layer_map(config)
    out = {}
    for key, value in state.items():
        new = _replace_prefix(key, UNET_TOP)
        if "resnets" in key:
            for original, diffusers in UNET_RESNET:
                new = new.replace(f".{diffusers}.", f".{original}.")
        new = _replace_prefix(new, layers)
        out["model.diffusion_model." + new] = value
    return out


def vae_layer_map(config: Any) -> list[tuple[str, str]]:
    lpb = config.layers_per_block
    n = len(config.block_out_channels)
    pairs = []
    for i in range(n):
        up = n - 1 - i
        for j in range(lpb):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            pairs.append((f"encoder.down.{i}.downsample.",
                          f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{up}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
        for j in range(lpb + 1):
            pairs.append((f"decoder.up.{up}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid.block_{i + 1}.", f"{part}.mid_block.resnets.{i}.")
                  for i in range(2)]
        pairs.append((f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0."))
    return pairs


def convert_vae(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    layers = vae_layer_map(config)
    out = {}
    for key, value in state.items():
        new = _replace_prefix(key, layers).replace("conv_shortcut", "nin_shortcut")
        new = new.replace("conv_norm_out", "norm_out")
        if "mid_block.attentions" in key:
            head, _, tail = new.rpartition("attn_1.")
            tail = _replace_prefix(tail, VAE_ATTENTION)
            new = head + "attn_1." + tail
            if value.ndim == 2:  # linear in diffusers, 1x1 convolution in the original
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def _with_text_model(key: str) -> str:
    # transformers 5 names the CLIPTextModel weights without the ``text_model.`` level the
    # original layout (and transformers 4) has.
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def convert_text_encoder(state: dict[str, torch.Tensor],
                         prefix: str = "cond_stage_model.transformer.") -> dict[str, torch.Tensor]:
    return {prefix + _with_text_model(k): v for k, v in state.items()}


OPEN_CLIP_LAYER = [
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
]
QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
OPEN_CLIP_TOP = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def convert_open_clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder in OpenCLIP's layout: q, k and v in one ``in_proj``,
    the projection as a transposed matrix."""
    state = {_with_text_model(k): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in OPEN_CLIP_TOP:
            out[prefix + OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T
        elif key.startswith("text_model.encoder.layers."):
            qkv = QKV.fullmatch(key)
            if qkv:
                layer, which, kind = qkv.groups()
                if which == "q":
                    out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
                        [state[key.replace(".q_proj.", f".{x}_proj.")] for x in "qkv"])
                continue
            new = "transformer.resblocks." + key.removeprefix("text_model.encoder.layers.")
            for ours, theirs in OPEN_CLIP_LAYER:
                new = new.replace(ours, theirs)
            out[prefix + new] = value
        # position_ids is a buffer the original layout does not hold.
    return out


def save_single_file(c: Components, path: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write UNet, VAE and text encoders as one checkpoint of ``c.family`` (fp16 by default)."""
    state: dict[str, torch.Tensor] = {}
    state.update(convert_unet(c.unet.state_dict(), c.unet.config))
    state.update(convert_vae(c.vae.state_dict(), c.vae.config))
    encoders = [e.state_dict() for e in c.text_encoders]
    if c.family == "sd1":
        state.update(convert_text_encoder(encoders[0]))
    elif c.family == "sd2":
        state.update(convert_open_clip(encoders[0], "cond_stage_model.model."))
    else:
        state.update(convert_text_encoder(encoders[0], "conditioner.embedders.0.transformer."))
        state.update(convert_open_clip(encoders[1], "conditioner.embedders.1.model."))
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}, tmp)
    tmp.replace(path)
    return path
