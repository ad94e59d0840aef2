"""``python serve_without_plugin.py OUT_JSON CHECKPOINT...``: vLLM's greedy answers for each checkpoint in a process
where gated_patch cannot be imported and vLLM loads no plugin: the checkpoint's own remote code
(``trust_remote_code=True``) through vLLM's Transformers backend, as a user without gated_patch serves it.
``TENSOR_PARALLEL=2`` in the environment: two engine workers, in processes of their own (no plugin there either)."""

import gc
import importlib.abc
import json
import os
import sys


class BlockGatedPatch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "gated_patch":
            raise ImportError("gated_patch is blocked in this process")


if __name__ == "__main__":
    sys.meta_path.insert(0, BlockGatedPatch())
    os.environ["VLLM_PLUGINS"] = "none"  # an allow-list naming no installed plugin: vLLM loads none
    tensor_parallel = int(os.environ.get("TENSOR_PARALLEL", "1"))
    if tensor_parallel > 1:  # workers in processes of their own; apply_model's function is pickled to them
        os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    from engine import model_class_name, vllm_engine, vllm_greedy

    answers = {}
    for path in sys.argv[2:]:
        llm = vllm_engine(path, trust_remote_code=True, tensor_parallel_size=tensor_parallel)
        classes = llm.apply_model(model_class_name)  # one per worker
        answers[path] = {"class": classes[0], "answers": vllm_greedy(llm)}
        del llm
        gc.collect()
    with open(sys.argv[1], "w") as f:
        json.dump(answers, f)
