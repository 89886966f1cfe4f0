#!/usr/bin/env python3
"""Convert IndexTTS-2 checkpoints into canonical safetensors. See README.md."""

from converters.cli import run

if __name__ == "__main__":
    run()
