#!/usr/bin/env python3
"""Convert IndexTTS-2 checkpoints into canonical safetensors. See README.md.

The same entry point as the installed ``indextts-convert`` console script: ``check``
runs with the standard library alone, the other commands through the click CLI."""

from converters.cli import console

if __name__ == "__main__":
    console()
