"""The MfM DiT: config, layers, specs and the model.

The names below load on first use, so the pure modules of this package (``geometry``,
``presets``) import without megatron.
"""

import importlib

_EXPORTS = {
    "MfMConfig": "config",
    "from_official_config": "config",
    "preset_config": "config",
    "MfMDiT": "dit",
    "build_model": "dit",
    "default_layer_spec": "specs",
    "local_layer_spec": "specs",
    "te_layer_spec": "specs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
