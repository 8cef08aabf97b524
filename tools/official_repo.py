"""Importing the official MfM code (github leeruibin/MfM) from a local checkout.

The checkout's ``mfm`` package is loaded from its folder by path (``sys.path`` is left alone),
with the alias its version check needs on torch >= 2.10, and with ``flash_attn`` hidden while
it imports: the official code takes any ``flash_attn`` for FlashAttention-2 and imports
``flash_attn_varlen_func`` from it, which FlashAttention-4's ``flash_attn`` (``flash_attn.cute``)
does not have. Hidden, it uses PyTorch SDPA, as it does wherever FlashAttention-2 is absent.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator


@contextlib.contextmanager
def _flash_attn_hidden() -> Iterator[None]:
    saved = {name: module for name, module in sys.modules.items() if name == "flash_attn" or name.startswith("flash_attn.")}
    sys.modules["flash_attn"] = None  # find_spec answers None, imports raise ImportError
    try:
        yield
    finally:
        del sys.modules["flash_attn"]
        sys.modules.update(saved)


def official_module(repo: Path | str, name: str) -> ModuleType:
    """Module ``name`` (e.g. ``mfm.modeling.transformer_3d``) of the official checkout at ``repo``."""
    import torch.utils.checkpoint as checkpoint

    if not hasattr(checkpoint, "_pt2_selective_checkpoint_context_fn_gen"):  # it compares version strings
        checkpoint._pt2_selective_checkpoint_context_fn_gen = checkpoint.create_selective_checkpoint_contexts
    with _flash_attn_hidden():
        if "mfm" not in sys.modules:
            spec = importlib.machinery.PathFinder.find_spec("mfm", [str(repo)])
            if spec is None:
                raise FileNotFoundError(f"{repo}: no mfm package there (expected a checkout of github leeruibin/MfM)")
            package = importlib.util.module_from_spec(spec)
            sys.modules["mfm"] = package
            spec.loader.exec_module(package)
        return importlib.import_module(name)


def load_official_class(repo: Path | str):
    """The official ``Transformer3DModel``."""
    return official_module(repo, "mfm.modeling.transformer_3d").Transformer3DModel
