"""Gated checkpoints on disk: the format (`format`), weight files (`weights`), checks before loading (`validate`),
the generated remote code for loading without the plugin (`remote_code`) and saving (`saving`, the plugin's classes)."""
