"""``python serve_in_processes.py CHECKPOINT TENSOR_PARALLEL OUT_JSON``: vLLM's greedy answers with its engine and
workers in their own processes (as vLLM runs by default), for the tensor-parallel test."""

import json
import os
import sys

if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    from engine import vllm_engine, vllm_greedy

    path, tensor_parallel, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    answers = vllm_greedy(vllm_engine(path, tensor_parallel_size=tensor_parallel))
    with open(out, "w") as f:
        json.dump(answers, f)
