"""The frozen T5 text encoder as the official MfM pipeline runs it.

Facts from ``mfm/pipelines/pipeline_mfm.py`` (leeruibin/MfM), ``encode_prompt``: each prompt is
lower-cased and stripped (``_text_preprocessing`` with ``clean_caption=False``), tokenized to
exactly 77 tokens (padding="max_length", truncation, the ``</s>`` end token added), and the
encoder runs WITHOUT the attention mask (``use_attention_mask=False``); the padding mask is
returned for the DiT's cross-attention. The tags (``#FPS: 16. #task: <name>``) are part of the
prompt itself: ``megatron_mfm/tasks/builders.py:task_prompt`` writes them as the official
``infer_mfm_pipeline.py`` does.
"""

from __future__ import annotations

import torch


def prepare_prompt(prompt: str) -> str:
    """What the official pipeline feeds the tokenizer."""
    return prompt.lower().strip()


class T5TextEncoder:
    """Prompts -> (states (B, max_length, d_model) float32, mask (B, max_length) 1 on real tokens)."""

    def __init__(self, tokenizer, encoder: torch.nn.Module, max_length: int = 77):
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_length = max_length

    @property
    def width(self) -> int:
        return self.encoder.config.d_model

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer([prepare_prompt(p) for p in prompts], padding="max_length",
                                max_length=self.max_length, truncation=True, add_special_tokens=True,
                                return_tensors="pt")
        device = next(self.encoder.parameters()).device
        states = self.encoder(input_ids=tokens.input_ids.to(device)).last_hidden_state
        return states.float(), tokens.attention_mask.to(device).float()
