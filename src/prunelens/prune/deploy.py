"""Where a pruning runs faster: the `prune --format` that turns each kind of change into a saving an
engine realises (docs/deploy.md), as one line for `advise` to print beside its recommendation."""

from __future__ import annotations

from prunelens.errors import PrunelensError
from prunelens.prune.recipe import Recipe

# kind of change -> (the --format that realises it, where it then runs faster)
ROUTES = {
    "sublayer": ("gguf", "llama.cpp/Ollama hold no weights or KV cache for a dropped attention (an HF base "
                 "adds --gguf-vocab BASE.gguf); --format nemotron-nas does the same for vLLM/SGLang/TensorRT-LLM"),
    "block": ("gguf", "fewer layers in every engine; --format hf for vLLM"),
    "quant": ("compressed-tensors", "vLLM serves the packed int4/int8 weights"),
    "awq": ("hf", "dense: AWQ's channel scales have no packed export here"),
    "sparse": ("hf", "dense with its zeros: no engine here turns them into speed (compressed-tensors dropped "
               "its sparse layouts)"),
}


def route(spec: str) -> str | None:
    """The export that realises ``spec``'s saving, e.g. ``attn:8`` → gguf or nemotron-nas; None for
    what is not a recipe (a model made elsewhere is served in its own format)."""
    try:
        names = {s.method.name for s in Recipe.parse(spec).steps}
    except PrunelensError:
        return None
    kinds = [k for k, hit in (("sublayer", names & {"attn", "mlp"}), ("block", names & {"block", "sleb"}),
                              ("quant", names & {"rtn", "gptq"}), ("awq", names & {"awq"}),
                              ("sparse", names & {"magnitude", "wanda", "sparsegpt", "owl"})) if hit]
    fmt, why = ROUTES[kinds[0]] if kinds else ("hf", "a plain checkpoint")
    out = "OUT.gguf" if fmt == "gguf" else "OUT"
    return f"prunelens prune --recipe {spec} --format {fmt} --out {out} — {why}"
