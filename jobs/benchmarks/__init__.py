"""Measurement logic of `logo-batch bench`: shapes and presets, inputs, methods, timing, report."""
