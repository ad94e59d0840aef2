"""The gate core: config, gate, hooks, tensor parallelism and the gated model classes; imports only torch and
transformers, and is what a gated checkpoint's remote code is generated from (`gated_patch.checkpoints.remote_code`)."""
