#!/usr/bin/env python3
"""Pretrain MfM with megatron-core (Megatron-style entry point).

  python pretrain_mfm.py --config examples/tiny_cpu.yaml train.iterations=50
  torchrun --nproc-per-node 8 pretrain_mfm.py --config examples/mfm_2b.yaml parallel.tensor_parallel=2

Overrides are ``section.field=value`` (see megatron_mfm/config/sections.py for every field). The whole
configuration is validated before any process group or GPU is touched.
"""

from __future__ import annotations

import argparse
import sys

from megatron_mfm.utils.warnings_filter import quiet_known_warnings

quiet_known_warnings()  # before megatron is imported: it warns at import time

from megatron_mfm.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run configuration")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        sys.exit(f"config error: {error}")

    from megatron_mfm.parallel.initialize import destroy_parallel
    from megatron_mfm.training.loop import train

    try:
        train(config)
    except ConfigError as error:  # checks that need the world size or the machine
        sys.exit(f"config error: {error}")
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
