"""The lm-eval route: any lm-evaluation-harness task through the ``prunelens`` model type (the
``lmeval`` extra). Here a local task YAML in lm-eval's own format, scored by lm-eval on the real
default model with a drop applied, must give prunelens's own answers on the same questions."""

from __future__ import annotations

import json
import subprocess
import sys
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


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_prunelens_registers_the_model_type_lazily() -> None:
    r = _python("import sys, prunelens\n"
                "assert 'prunelens.lmeval' not in sys.modules and 'lm_eval.models.huggingface' not in sys.modules\n"
                "import lm_eval\n"
                "from lm_eval.api.registry import get_model\n"
                "print(get_model('prunelens').__module__, get_model('hf').__name__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["prunelens.lmeval", "HFLM"]


def test_import_prunelens_without_lm_eval_is_quiet() -> None:
    r = _python("import sys\nsys.modules['lm_eval'] = None\nimport prunelens\nprint('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_results_folder_name_carries_the_modification() -> None:
    from prunelens.lmeval import _LABELS, model_name

    _LABELS["attn:1"] = "attn@2"
    assert model_name("pretrained=/m/tiny,dtype=float32") == "/m/tiny"
    assert model_name("pretrained=/m/tiny,prune=attn:1") == "/m/tiny+attn@2"
    assert model_name({"pretrained": "smollm2-135m", "prune": "wanda:0.5"}) == "smollm2-135m+wanda:0.5"
    assert model_name("pretrained=gpt2") == "gpt2"  # another model type: as lm-eval names it


def test_simple_evaluate_records_the_real_device_and_the_modification(tiny_dir: Path, tmp_path: Path) -> None:
    import lm_eval
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lm_eval.tasks import TaskManager

    import prunelens  # noqa: F401  registers the model type: no `import prunelens.lmeval`

    rows = [{"question": f"w{3 + i} w{4 + i}", "choices": ["w5", "w6 w7"], "answer": i % 2} for i in range(4)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "pl_tiny.yaml").write_text(TASK_YAML.replace("pl_arc_subset", "pl_tiny").format(data=data))
    args = f"pretrained={tiny_dir},prune=attn:1"
    out = lm_eval.simple_evaluate(model="prunelens", model_args=args, tasks=["pl_tiny"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                  batch_size=2, log_samples=False, bootstrap_iters=0)
    pl = out["config"]["prunelens"]
    assert pl["device"] == "cpu" and pl["modification_label"].startswith("attn@")
    assert pl["modification"]["attn"] and len(pl["modification"]["attn"]) == 1
    assert GeneralConfigTracker._get_model_name(args) == f"{tiny_dir}+{pl['modification_label']}"
