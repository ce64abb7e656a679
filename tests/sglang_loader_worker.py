"""Worker of tests/test_sglang_serving.py: one export through SGLang per process (SGLang
initializes its runtime once per process).

usage: python tests/sglang_loader_worker.py EXPORT_DIR           # SGLang's class + loader
       python tests/sglang_loader_worker.py EXPORT_DIR --markov  # SGLang's Markov head
"""
import json
import sys


def markov_parity(path: str) -> dict:
    """SGLang's own Markov head (models/dspark.py::build_markov_head, a plain module) with
    the export's weights, walked step by step over a block as SGLang drafts (``init_state``,
    then ``step_bias`` per slot), against the reference maths of megaspark's head
    (tests/reference.py::markov_bias, equal to megaspark's model in test_model_parallel)."""
    import os

    import torch
    from safetensors.torch import load_file
    from transformers import PretrainedConfig

    from megaspark.targets.sglang_runtime import prepare_environment
    from tests import reference

    prepare_environment("cpu")
    from sglang.srt.models.dspark import build_markov_head

    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    head = build_markov_head(PretrainedConfig(**raw)).float()
    tensors = load_file(os.path.join(path, "model.safetensors"))
    state = {k[len("markov_head."):]: v.float() for k, v in tensors.items() if k.startswith("markov_head.")}
    missing, unexpected = head.load_state_dict(state, strict=False)
    g = torch.Generator().manual_seed(0)
    n, B, H, V = 3, int(raw["block_size"]), int(raw["hidden_size"]), int(raw["vocab_size"])
    h = torch.randn(n, B, H, generator=g)
    prev = torch.randint(0, V, (n, B), generator=g)
    with torch.no_grad():
        st = head.init_state(h[:, 0])
        got = []
        for k in range(B):
            bias, st = head.step_bias(prev[:, k], hidden_states=h[:, k], state=st)
            got.append(bias)
        got = torch.stack(got, dim=1)
        ref = reference.markov_bias({k: v.float() for k, v in tensors.items()},
                                    {"markov_head_type": raw["markov_head_type"],
                                     "markov_rank": raw["markov_rank"]}, h, prev)
    return {"head": type(head).__name__, "missing": list(missing), "unexpected": list(unexpected),
            "max_abs_diff": (got - ref).abs().max().item(), "scale": ref.abs().max().item()}


if __name__ == "__main__":
    if "--markov" in sys.argv[2:]:
        result = markov_parity(sys.argv[1])
    else:
        from megaspark.targets.sglang_runtime import check_draft_in_sglang

        result = check_draft_in_sglang(sys.argv[1])
    print("RESULT " + json.dumps(result), flush=True)
