"""Re-quantise a GGUF file with gguf-py's own quantisers (F32, F16, Q8_0, Q4_0), every metadata key
copied: a llama.cpp-format candidate of the bundled model made offline, without building llama.cpp.

    python benchmarks/clients/requantize_gguf.py --qtype Q4_0 --out /tmp/smollm2-q4_0.gguf   # default model
    prunelens analyze --candidate /tmp/smollm2-q4_0.gguf --limit 4 --steps 16

The function lives in ``prunelens.testing`` (``requantize_gguf``) because the slow tests make the same
candidates; this script is its command line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prunelens.model.loading import DEFAULT_MODEL, PRESETS, preset_gguf
from prunelens.testing import GGUF_QTYPES, requantize_gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", help=f"GGUF file to re-quantise (default: the {DEFAULT_MODEL} preset's file)")
    ap.add_argument("--qtype", required=True, choices=sorted(GGUF_QTYPES))
    ap.add_argument("--out", required=True, help="output .gguf file")
    args = ap.parse_args()
    src = Path(args.src) if args.src else preset_gguf(PRESETS[DEFAULT_MODEL])
    t0 = time.perf_counter()
    out = requantize_gguf(src, args.out, args.qtype)
    print(json.dumps({"src": str(src), "out": str(out), "qtype": args.qtype, "bytes": out.stat().st_size,
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
