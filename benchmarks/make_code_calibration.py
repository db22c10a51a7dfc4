"""A code-domain calibration file from MBPP's *train* split (task_ids 601–974: never evaluated), for
comparing calibration domains (issue 19: web text vs code). Each line is {"text": problem + code}.

    python benchmarks/make_code_calibration.py ../shared/data/mbpp.jsonl /tmp/mbpp_train_calib.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: make_code_calibration.py MBPP_JSONL OUT_JSONL")
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    train = [r for r in rows if 601 <= int(r["task_id"]) <= 974]
    if not train:
        raise SystemExit(f"make_code_calibration: {src} holds no MBPP train rows (task_id 601-974)")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps({"text": f"{r['text']}\n{r['code']}".replace("\r\n", "\n")}) + "\n"
                           for r in train))
    tmp.replace(out)
    print(f"{len(train)} MBPP train problems written to {out}")


if __name__ == "__main__":
    main()
