"""Delete decoder layers the way ShortGPT-style scripts do, in plain transformers: load, ``del
model.model.layers[i]``, renumber the attention modules' ``layer_idx``, lower ``num_hidden_layers``,
``save_pretrained``. The output records nothing about what was deleted, so prunelens must infer the
layer correspondence (or be given ``--layer-map``).

    python benchmarks/clients/delete_layers.py --layers 20,21,22 --out /tmp/smollm2-minus3
    prunelens analyze --candidate /tmp/smollm2-minus3 --limit 4 --steps 16

The deletion itself is ``prunelens.testing.delete_decoder_layers`` (plain transformers attributes
only), shared with the tests; prunelens is used here only to find the default model's files.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunelens.model.loading import DEFAULT_MODEL, resolve_source
from prunelens.testing import delete_decoder_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a Hugging Face directory, hub id or prunelens preset")
    ap.add_argument("--layers", default="20,21,22", help="comma-separated decoder layers to delete (0-based)")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    src = resolve_source(args.model)[0]
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    n = model.config.num_hidden_layers
    if any(not 0 <= i < n for i in layers):
        raise SystemExit(f"--layers {args.layers}: the model has layers 0..{n - 1}")
    delete_decoder_layers(model, layers)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(src).save_pretrained(args.out)
    print(json.dumps({"model": str(src), "deleted": sorted(set(layers)), "layers_left": model.config.num_hidden_layers,
                      "out": args.out, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
