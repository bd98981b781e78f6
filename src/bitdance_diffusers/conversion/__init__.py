"""Converters from the original BitDance releases to diffusers folders (CLI scripts live in ``conversion/``)."""
