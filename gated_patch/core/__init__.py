"""The gate core: config, gate, the attention mechanism and the checkpoint classes; imports only torch and
transformers, and is what a gated checkpoint's remote code is generated from (`gated_patch.checkpoints.remote_code`)."""
