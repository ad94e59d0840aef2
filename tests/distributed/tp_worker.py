"""Run under ``torchrun --nproc_per_node 2``: load checkpoints with tensor parallelism, write what each rank computed.

Usage: tp_worker.py CASES_JSON RESULT_JSON. CASES_JSON lists ``{"name", "path", "routes"}``; the reference logits (one
process) sit in ``<path>/reference.pt`` with the input ids. Checkpoints load first without the plugin
(``trust_remote_code=True``, before gated_patch is imported), then with it; RESULT_JSON gets, per case and route,
the max |logits difference| or the error message.
"""

import json
import sys
import traceback

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM


def load(path, route, plugin):
    kwargs = {} if plugin else {"trust_remote_code": True}
    if route == "tp_plan":
        return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", **kwargs)
    from transformers.distributed import DistributedConfig
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=2), **kwargs)


def run(case, route, plugin):
    reference = torch.load(f"{case['path']}/reference.pt")
    try:
        model = load(case["path"], route, plugin).eval()
        with torch.no_grad():
            logits = model(reference["input_ids"]).logits
            decode = model.generate(reference["input_ids"][:1, :4], max_new_tokens=4, do_sample=False)
        result = {"max_diff": (logits - reference["logits"]).abs().max().item(),
                  "generate_equal": torch.equal(decode, reference["generated"])}
        if case.get("save"):  # checkpoints saved from a TP model are the normal gated format
            model.save_pretrained(case["save"])
        if plugin and case.get("patch_sharded"):
            import gated_patch
            try:
                gated_patch.patch_model(load(case["patch_sharded"], route, plugin))
                result["patch_sharded"] = "patched"
            except Exception as exc:  # noqa: BLE001 - the refusal is what is tested
                result["patch_sharded"] = f"{type(exc).__name__}: {exc}"
        return result
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}


def main(cases_file, result_file):
    dist.init_process_group("gloo")
    cases = json.load(open(cases_file))
    results = {}
    for plugin in (False, True):
        if plugin:
            import gated_patch  # noqa: F401 - registers the gated model types
        for case in cases:
            for route in case["routes"]:
                results[f"{case['name']}|{route}|{'plugin' if plugin else 'remote'}"] = run(case, route, plugin)
    if dist.get_rank() == 0:
        json.dump(results, open(result_file, "w"), indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
