"""Gated checkpoints: the on-disk format (`format`), saving (`saving`) and loading with the plugin (`loading`), the
generated remote code for loading without it (`remote_code`), file checks (`files`, `validate`), the streaming
converter (`convert`), the fused gate layouts of other implementations (`layouts`), model cards and Hub upload."""
