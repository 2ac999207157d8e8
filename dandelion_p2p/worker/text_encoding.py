"""Prompts to text-encoder hidden states: long captions in chunks, and ``clip_skip``.

A caption longer than the encoder's window (75 tokens for CLIP) is read as kohya and A1111 do:
its tokens are cut into ``chunks`` pieces of 75, each wrapped with BOS and EOS and padded to
the window like a prompt of its own, encoded separately, and the hidden states are put one
after another (``chunks`` x 77 positions). Unused chunks hold the empty prompt. With one chunk
this is exactly the usual tokenisation (truncated at 75 tokens).

``clip_skip`` n > 1 takes the output of the n-th layer from the end, through the encoder's
final layer norm (as kohya and A1111 do). SDXL reads the penultimate layer of both encoders
and the pooled embedding of the second encoder's first chunk, as kohya's SDXL scripts do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import DataConfig


def chunked_ids(tokenizer: Any, captions: Sequence[str], chunks: int) -> torch.Tensor:
    """Token ids (B * chunks, window): each caption's chunks, one row each."""
    window = int(tokenizer.model_max_length)
    body = window - 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = tokenizer(list(captions), add_special_tokens=False, truncation=True,
                        max_length=body * chunks).input_ids
    rows: list[list[int]] = []
    for tokens in encoded:
        for k in range(chunks):
            part = list(tokens[k * body:(k + 1) * body])
            rows.append([bos, *part, eos] + [pad] * (body - len(part)))
    return torch.tensor(rows, dtype=torch.long)


def encode_prompts(tokenizers: Sequence[Any], encoders: Sequence[Any], captions: Sequence[str],
                   *, sdxl: bool, clip_skip: int, chunks: int,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """``hidden`` (B, chunks * window, width of all encoders) and, for SDXL, ``pooled``."""
    batch = len(captions)
    hidden: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        ids = chunked_ids(tokenizer, captions, chunks).to(device)
        if sdxl:
            output = encoder(ids, output_hidden_states=True)
            states = output.hidden_states[-2]
            pooled = output[0].reshape(batch, chunks, -1)[:, 0]
        elif clip_skip == 1:
            states = encoder(ids)[0]
        else:
            output = encoder(ids, output_hidden_states=True)
            layers = len(output.hidden_states) - 1
            if clip_skip > layers:
                raise ConfigError(f"data.clip_skip = {clip_skip}, but the text encoder has "
                                  f"only {layers} layers")
            states = _final_norm(encoder)(output.hidden_states[-clip_skip])
        hidden.append(states.reshape(batch, -1, states.shape[-1]))
    result = {"hidden": torch.cat(hidden, dim=-1).float()}
    if pooled is not None:
        result["pooled"] = pooled.float()
    return result


def _final_norm(encoder: Any) -> Any:
    # transformers 5 holds the layers on the model itself; earlier releases in text_model.
    inner = getattr(encoder, "text_model", encoder)
    return inner.final_layer_norm


def pipeline_prompt(c: Any, data: DataConfig, prompt: str,
                    device: torch.device) -> dict[str, Any]:
    """The prompt arguments of a diffusers pipeline call that condition on ``prompt`` as
    training does: the prompt itself under the usual settings, else embeddings encoded here
    (the pipeline's own ``clip_skip`` needs the encoder layout of older transformers)."""
    chunks = data.max_token_length // 75
    if (data.clip_skip, chunks) == (1, 1):
        return {"prompt": prompt}
    with torch.no_grad():
        positive, negative = (
            encode_prompts(c.tokenizers, c.text_encoders, [text], sdxl=c.is_sdxl,
                           clip_skip=data.clip_skip, chunks=chunks, device=device)
            for text in (prompt, ""))
    out = {"prompt_embeds": positive["hidden"], "negative_prompt_embeds": negative["hidden"]}
    if c.is_sdxl:
        out["pooled_prompt_embeds"] = positive["pooled"]
        out["negative_pooled_prompt_embeds"] = negative["pooled"]
    return out
