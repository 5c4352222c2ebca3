#!/usr/bin/env python
"""Evaluate a DiffEnc / VDM pipeline: test-set bits/dim (continuous and T-step), a sample grid, the encoder figure.

The same command as the installed console script ``diffenc-evaluate``; see ``--help`` and training/README.md.

    python training/evaluate_diffenc.py --pipeline outputs/digits --dataset digits --num_timesteps 100 \\
        --output_json outputs/digits/eval.json --sample_grid outputs/digits/samples.png
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffenc_diffusers.evaluation import cli

if __name__ == "__main__":
    cli()
