"""The lm-eval route: any lm-evaluation-harness task through the ``prunelens`` model type (the
``lmeval`` extra). Here a local task YAML in lm-eval's own format, scored by lm-eval on the real
default model with a drop applied, must give prunelens's own answers on the same questions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from prunelens.testing import shared_data_dir

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'prunelens[lmeval]')")

DATA = shared_data_dir()

TASK_YAML = """
task: pl_arc_subset
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_lmeval_scores_a_local_task_yaml_as_prunelens_does(real_lm: Any, tmp_path: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import prunelens.lmeval  # noqa: F401  registers the model type
    from prunelens.prune.recipe import Calibration, Recipe, build
    from prunelens.tasks.mcq import evaluate_mcq

    rows = [json.loads(line) for line in (DATA / "arc_easy_test.jsonl").read_text().splitlines()[:16]]
    sub = tmp_path / "data"
    sub.mkdir()
    (sub / "arc_easy_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "pl_arc_subset.yaml").write_text(TASK_YAML.format(data=sub / "arc_easy_test.jsonl"))

    out = lm_eval.simple_evaluate(model="prunelens", model_args="pretrained=smollm2-135m,prune=attn:2",
                                  tasks=["pl_arc_subset"], task_manager=TaskManager(include_path=str(tmp_path /
                                                                                                     "tasks")),
                                  batch_size=8, device="cpu", log_samples=True, bootstrap_iters=0)
    theirs = [int(max(range(len(s["filtered_resps"])), key=lambda k: s["filtered_resps"][k][0]))
              for s in sorted(out["samples"]["pl_arc_subset"], key=lambda s: s["doc_id"])]

    plan = build(real_lm, Recipe.parse("attn:2"), Calibration(), progress=False)
    ours = evaluate_mcq(real_lm, "arc_easy", sub, modification=plan, progress=False)
    assert len(theirs) == ours.n == 16
    assert theirs == ours.predictions
    assert out["results"]["pl_arc_subset"]["acc,none"] == pytest.approx(ours.acc)
