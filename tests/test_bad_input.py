"""Hostile and careless input on the command line: one line on stderr naming the problem, exit 2,
nothing left behind (issue 15). Runs on a tiny saved model, so the whole table takes seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunelens.cli import main
from prunelens.testing import save_tiny, tiny_tokenizer

# placeholders: MODEL (tiny saved model), NAN (the same with a NaN weight), LATIN1 (a file that is
# not UTF-8), DATA_LATIN1 / DATA_BADGZ (data dirs whose task file is not UTF-8 / not gzip),
# FILE (an existing file), DIR (an existing directory), OUT (a path that must not appear)
CASES = [
    (["analyze", "--model", "NAN", "--drop", "attn@1", "--steps", "1", "--out", "OUT"], "NaN or infinite weights"),
    (["eval", "--model", "NAN", "--tasks", "fidelity", "--limit", "1"], "NaN or infinite weights"),
    (["analyze", "--model", "MODEL", "--drop", "attn@3", "--drop", "attn@3", "--out", "OUT"], "appears twice"),
    (["analyze", "--model", "MODEL", "--prune", "magnitude:0:4", "--out", "OUT"], "1 <= N <= M"),
    (["analyze", "--model", "MODEL", "--prune", "gptq:w4g128", "--out", "OUT"], "is a quant spec"),
    (["analyze", "--model", "MODEL", "--prompts", "LATIN1", "--out", "OUT"], "is not UTF-8 text"),
    (["analyze", "--model", "MODEL", "--drop", "attn:1", "--calib", "LATIN1", "--out", "OUT"], "is not UTF-8"),
    (["ppl", "--model", "MODEL", "--text", "LATIN1"], "is not UTF-8 text"),
    (["eval", "--model", "MODEL", "--tasks", "arc_easy", "--data-dir", "DATA_LATIN1"], "is not UTF-8 text"),
    (["eval", "--model", "MODEL", "--tasks", "mmlu", "--data-dir", "DATA_BADGZ"], "is not a valid gzip file"),
    (["analyze", "--model", "MODEL", "--out", "/proc/prunelens-x/run"], "cannot write"),
    (["analyze", "--model", "MODEL", "--save-pruned", "/proc/prunelens-x", "--out", "OUT"], "cannot write"),
    (["prune", "--model", "MODEL", "--drop", "attn@1", "--out", "/proc/prunelens-x"], "cannot write"),
    (["eval", "--model", "MODEL", "--tasks", "fidelity", "--out", "/proc/prunelens-x.json"], "cannot write"),
    (["report", "DIR", "--out", "/proc/prunelens-x.html"], "cannot write"),
    (["compare", "--model", "MODEL", "--method", "attn:1", "--out", "FILE"], "is not a directory"),
    (["eval", "--model", "MODEL", "--tasks", "fidelity", "--out", "DIR"], "is a directory"),
    (["ppl", "--model", "MODEL", "--text", "FILE", "--out", "DIR"], "is a directory"),
    (["eval", "--model", "MODEL", "--tasks", "fidelity", "--out", "FILE"], "already exists (use --overwrite)"),
    (["subspace", "--model", "MODEL", "--task", "mmlu", "--data-dir", "DATA_BADGZ", "--method", "attn:1",
      "--batch-size", "0", "--out", "OUT"], "--batch-size must be at least 1"),
    (["compare", "--model", "MODEL", "--method", "wanda:0.5", "--calib-samples", "0", "--out", "OUT"],
     "--calib-samples must be at least 1"),
    (["compare", "--model", "MODEL", "--method", "attn:40", "--out", "OUT"], "cannot drop 40 attn units"),
    (["sweep", "--model", "/no/such/model", "--method", "attn", "--amounts", "0,1", "--tasks", "fidelity",
      "--out", "OUT"], "does not exist"),
    (["sweep", "--model", "MODEL", "--method", "attn", "--amounts", "0,40", "--tasks", "fidelity",
      "--out", "OUT"], "cannot drop 40 attn units"),
    # the checks before any work, on the tiny saved model (4 layers)
    (["analyze", "--model", "/no/such/model", "--drop", "attn@1", "--out", "OUT"], "does not exist"),
    (["analyze", "--model", "not-a-preset", "--drop", "attn@1", "--out", "OUT"], "unknown model"),
    (["analyze", "--model", "MODEL", "--drop", "attn:4", "--out", "OUT"], "need 0 <= N < 4"),
    (["analyze", "--model", "MODEL", "--drop", "attn:-1", "--out", "OUT"], "malformed drop spec"),
    (["analyze", "--model", "MODEL", "--drop", "attn=4", "--out", "OUT"], "malformed drop spec"),
    (["analyze", "--model", "MODEL", "--drop", "block@4", "--out", "OUT"], "layers 0..3"),
    (["analyze", "--model", "MODEL", "--temps", "0", "--out", "OUT"], "temperature must be positive"),
    (["analyze", "--model", "MODEL", "--temps=-1", "--out", "OUT"], "temperature must be positive"),
    (["analyze", "--model", "MODEL", "--steps", "0", "--out", "OUT"], "--steps must be at least 1"),
    (["analyze", "--model", "MODEL", "--prompts", "EMPTY", "--out", "OUT"], "is empty"),
    (["analyze", "--model", "MODEL", "--prompts", "BADJSON", "--out", "OUT"], "badjson.jsonl:2: not valid JSON"),
    (["report", "/no/such/run"], "does not exist"),
    # issue 42 §2: crafted or truncated run folders, read back by report and families
    (["report", "RUN_SWEEP_EMPTY"], "sweep.json': field 'model' is missing"),
    (["families", "RUN_SWEEP_EMPTY", "--out", "OUT"], "sweep.json': field 'model' is missing"),
    (["report", "RUN_CELL_EMPTY"], "0--fidelity.json': field 'amount' is missing"),
    (["families", "RUN_CELL_EMPTY", "--out", "OUT"], "0--fidelity.json': field 'amount' is missing"),
    (["report", "RUN_CELL_BADSCORE"], "field 'score' must be a number"),
    (["report", "RUN_NO_KEYS"], "results.json': field 'model' is missing"),
    (["report", "RUN_NO_KEYS", "RUN_SWEEP_EMPTY", "--out", "OUT"], "field 'model' is missing"),
    (["report", "RUN_BAD_TYPE"], "field 'n_prompts' must be an integer"),
    (["report", "RUN_NOT_OBJECT"], "is not a prunelens analysis result"),
    (["report", "RUN_CELL_LIST"], "0--fidelity.json': the file must be an object"),
    (["report", "RUN_SYMLINK_FIG"], "is not a regular file inside the run folder"),
    # issue 42 §3-4: writes that look complete, silent wrong results
    (["prune", "--model", "MODEL", "--drop", "attn@1", "--out", "DATA_LATIN1", "--overwrite"],
     "holds no model checkpoint; not overwriting it"),
    (["advise", "--model", "MODEL", "--budget", "10%", "--use", "generative", "--candidates", ",",
      "--out", "OUT"], "names no candidate"),
    (["advise", "--model", "MODEL", "--budget", "10%", "--use", "generative", "--candidates", " , ,",
      "--out", "OUT"], "names no candidate"),
    (["ppl", "--model", "MODEL", "--text", "FILE", "--kld"], "nothing to do"),
    (["analyze", "--model", "MODEL", "--out", "OUT"], "nothing to do"),
    (["analyze", "--model", "MODEL", "--steps", "1", "--out", "OUT"], "nothing to do"),
    (["analyze", "--model", "MODEL", "--prune", "magnitude:0.5", "--prune-skip", "9", "--out", "OUT"],
     "--prune-skip '9' matches no linear layer"),
    (["analyze", "--model", "MODEL", "--prune", "magnitude:0.5", "--prune-skip", "0", "--prune-skip",
      "*.mlp.down_prj", "--out", "OUT"], "--prune-skip '*.mlp.down_prj' matches no linear layer"),
    (["prune", "--model", "MODEL", "--drop", "attn@1", "--prune-skip", "0", "--out", "OUT"], "the recipe has none"),
    (["analyze", "--model", "MODEL", "--drop", "attn@1", "--device-map", "BADMAP", "--out", "OUT"],
     "no module named 'model.layerz.0'"),
    (["analyze", "--model", "MODEL", "--drop", "attn@1", "--temps", "1e-300", "--out", "OUT"], "is below 0.001"),
    (["analyze", "--model", "MODEL", "--drop", "attn@1", "--temps", "1,0.0001", "--out", "OUT"], "is below 0.001"),
    (["analyze", "--model", "MODEL", "--recipe", "block@2+repair:linear:0:strict", "--calib-samples", "1",
      "--calib-len", "4", "--out", "OUT"], "raises the next-token KL"),
    (["analyze", "--model", "MODEL", "--recipe", "block@2+repair:linear:inf", "--out", "OUT"], "malformed repair spec"),
    # issue 42 §5: malformed configs and options
    (["eval", "--model", "MODEL", "--tasks", "CFG_IGNORE"], "ignore regex '([' is invalid"),
    (["eval", "--model", "MODEL", "--tasks", "CFG_GROUP"], "extract group 2 is not a group of regex 'a(b)'"),
    (["eval", "--model", "MODEL", "--tasks", "CFG_REGEX_NUMBER"], "extract regex must be a text (quote it), got 5"),
    (["eval", "--model", "MODEL", "--tasks", "CFG_IGNORE_NUMBER"], "ignore regex must be a text (quote it), got 5"),
    (["eval", "--model", "MODEL", "--tasks", "CFG_FEWSHOT"], "num_fewshot must be a whole number >= 0, got 'two'"),
    (["eval", "--model", "MODEL", "--tasks", "CFG_DATA_FILES"], "data_files must name a file, a list of files"),
    (["eval", "--model", "MODEL", "--tasks", "CFG_MAX_NEW"], "max_new_tokens must be a whole number >= 1, got 'lots'"),
    (["eval", "--model", "MODEL", "--tasks", "CFG_UNTIL"], "until must be a stop string or a list of non-empty"),
    (["eval", "--model", "MODEL", "--tasks", "CFG_FLAG"], "ignore_case must be true or false, got 'maybe'"),
    (["eval", "--model", "MODEL", "--tasks", "CFG_TEMPLATE"], "fewshot_target: template error"),
    (["eval", "--model", "MODEL", "--tasks", "CFG_CYCLE"], "is refused: an alias in it refers to a node"),
    (["sweep", "--model", "MODEL", "--method", "attn", "--amounts", "0,1", "--tasks", "CFG_SELECT", "--out", "OUT"],
     "extract select must be one of first, last, got 'middle'"),
    (["ppl", "--model", "MODEL", "--text", "SHORT", "--drop", "attn:1", "--offload-dir", "FILE"],
     "existing.json' exists and is not a directory"),
    (["eval", "--model", "MODEL", "--tasks", "fidelity", "--offload-dir", "/proc/prunelens-x"],
     "cannot write to --offload-dir '/proc/prunelens-x'"),
    (["counterfactual", "--model", "MODEL", "--kinds", "", "--out", "OUT"], "--kinds '' names no kind"),
    (["counterfactual", "--model", "MODEL", "--kinds", " , ", "--out", "OUT"], "names no kind; give one or more of"),
    (["ppl", "--model", "MODEL", "--text", "SHORT", "--drop", "attn:1", "--kld", "--seq-len", "2", "--max-windows",
      "1"], "KL statistics need at least 2 predicted tokens"),
    (["ppl", "--model", "MODEL", "--text", "SHORT", "--drop", "attn:1", "--kld", "--seq-len", "2"],
     "1 window(s) of 2 tokens predict 1: use --seq-len 3 or more"),
    # issue 42 §6: what a new user trips over
    (["analyze", "--model", "MODEL", "--recipe", "wandaa:0.5", "--out", "OUT"], "did you mean 'wanda'?"),
    (["compare", "--model", "MODEL", "--recipe", "atn:1", "--out", "OUT"], "did you mean 'attn'?"),
    (["eval", "--model", "MODEL", "--task", "arc_esy"], "unknown task 'arc_esy'; did you mean 'arc_easy'?"),
    (["subspace", "--model", "MODEL", "--tasks", "mmlux", "--recipe", "attn:1", "--out", "OUT"],
     "did you mean 'mmlu'?"),
    (["paired", "--model", "MODEL", "--tasks", "arc_easyy", "--recipe", "attn:1", "--out", "OUT"],
     "unknown paired task 'arc_easyy'; did you mean 'arc_easy'?"),
    (["paired", "--model", "MODEL", "--tasks", "arc_easy", "--method", "attn:1", "--max-new-tokens", "0",
      "--out", "OUT"], "--max-new-tokens must be at least 1"),
    (["sweep", "--model", "MODEL", "--method", "wandaa", "--amounts", "0,1", "--tasks", "fidelity",
      "--out", "OUT"], "unknown sweep method 'wandaa'; did you mean 'wanda'?"),
    (["advise", "--model", "MODEL", "--budget", "15", "--use", "generative", "--out", "OUT"],
     "did you mean '15%'?"),
    (["advise", "--model", "MODEL", "--budget", "20%", "--use", "generative", "--recipe", "gptqq:w4",
      "--out", "OUT"], "did you mean 'gptq'?"),
    # issue 43: a candidate made elsewhere, scored against its base
    (["eval", "--model", "MODEL", "--tasks", "CFG_MC", "--candidate", "CAND_TOK", "--recipe", "attn:1",
      "--out", "OUT"], "give either --candidate (a model made elsewhere) or a recipe, not both"),
    (["ppl", "--model", "MODEL", "--text", "SHORT", "--kld", "--candidate", "/no/such/candidate", "--out", "OUT"],
     "--candidate '/no/such/candidate' does not exist"),
    (["ppl", "--model", "MODEL", "--text", "SHORT", "--kld", "--candidate", "CAND_TOK", "--positions", "middle",
      "--out", "OUT"], "--positions must be one of all, second-half, got 'middle'"),
    (["ppl", "--model", "MODEL", "--text", "SHORT", "--kld", "--candidate", "CAND_TOK", "--positions",
      "second-half", "--seq-len", "2", "--out", "OUT"], "leaves no second-half position to score"),
    (["ppl", "--model", "MODEL", "--text", "SHORT", "--kld", "--candidate", "CAND_TOK", "--out", "OUT"],
     "does not share the base's tokenizer: vocabulary sizes differ"),
    (["eval", "--model", "MODEL", "--tasks", "CFG_MC", "--candidate", "CAND_TOK", "--out", "OUT"],
     "does not share the base's tokenizer: vocabulary sizes differ"),
    (["ppl", "--model", "MODEL", "--text", "SHORT", "--kld", "--candidate", "MODEL", "--out", "OUT"],
     "is the base model itself: every divergence would be 0 (KL 0 is expected)"),
    (["eval", "--model", "MODEL", "--tasks", "CFG_MC", "--candidate", "MODEL_LINK", "--out", "OUT"],
     "is the base model itself"),
    (["eval", "--model", "MODEL", "--tasks", "fidelity", "--candidate", "CAND_TOK", "--out", "OUT"],
     "task 'fidelity' compares a model with a view of itself and cannot score a --candidate"),
    (["analyze", "--model", "MODEL", "--candidate", "CAND_TOK", "--steps", "1", "--out", "OUT"],
     "does not share the base's tokenizer: vocabulary sizes differ"),
    (["analyze", "--model", "MODEL", "--candidate", "MODEL", "--out", "OUT"], "is the base model itself"),
    (["analyze", "--model", "MODEL", "--candidate", "NAN", "--steps", "1", "--out", "OUT"],
     "NaN or infinite weights"),
    (["analyze", "--model", "MODEL", "--candidate", "CAND_COPY", "--layer-map", "LAYERMAP_BAD", "--steps", "1",
      "--out", "OUT"], "names base layer 9"),
    (["analyze", "--model", "MODEL", "--candidate", "CAND_GPTQ", "--steps", "1", "--out", "OUT"],
     "is a gptq checkpoint and this run is on the CPU"),
    (["analyze", "--model", "MODEL", "--candidate", "CAND_WEIRDQ", "--steps", "1", "--out", "OUT"],
     "quantisation 'weird'"),
    (["analyze", "--model", "MODEL", "--candidate", "nobody/no-such-model", "--steps", "1", "--out", "OUT"],
     "nobody/no-such-model"),
    (["analyze", "--model", "MODEL", "--sequential", "--out", "OUT"], "compare a --candidate with its base"),
    (["analyze", "--model", "MODEL", "--candidate", "CAND_COPY", "--reference-topk", "0", "--out", "OUT"],
     "--reference-topk must be at least 1"),
    (["analyze", "--model", "MODEL", "--candidate", "CAND_COPY", "--reference-cache", "FILE", "--steps", "1",
      "--out", "OUT"], "cannot be read"),
    (["analyze", "--model", "MODEL", "--candidate", "CAND_COPY", "--layer-map", "/no/such/map.json", "--out", "OUT"],
     "--layer-map /no/such/map.json does not exist"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    latin1 = root / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\nd\xe9j\xe0 vu\n".encode("latin-1"))
    d1 = root / "data-latin1"
    d1.mkdir()
    (d1 / "arc_easy_test.jsonl").write_bytes('{"question": "caf\xe9"}\n'.encode("latin-1"))
    d2 = root / "data-badgz"
    d2.mkdir()
    (d2 / "mmlu_test.jsonl.gz").write_text('{"not": "gzip"}\n')
    existing = root / "existing.json"
    existing.write_text("{}")
    (root / "adir").mkdir()
    (root / "empty.txt").write_text("\n\n")
    (root / "badjson.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    (root / "badmap.json").write_text(json.dumps({"": "cpu", "model.layerz.0": "cpu"}))  # a typo'd module
    runs = _crafted_runs(root, latin1)
    runs.update(_bad_configs(root))
    runs["CAND_TOK"] = str(_other_tokenizer(root / "cand-tok"))
    runs["CAND_COPY"] = str(save_tiny(root / "cand-copy"))  # the base's weights under another path
    runs["LAYERMAP_BAD"] = str(_text(root / "layermap.json", json.dumps([0, 1, 2, 9])))
    runs["CAND_GPTQ"] = str(_quantised(root / "cand-gptq", {"quant_method": "gptq", "bits": 4}))
    runs["CAND_WEIRDQ"] = str(_quantised(root / "cand-weirdq", {"quant_method": "weird"}))
    (root / "model-link").symlink_to(tiny_dir)  # the base under another name
    runs["MODEL_LINK"] = str(root / "model-link")
    return {"EMPTY": str(root / "empty.txt"), "BADJSON": str(root / "badjson.jsonl"),
            "BADMAP": str(root / "badmap.json"),
            "MODEL": str(tiny_dir), "NAN": str(save_tiny(root / "nan", nan=True)), "LATIN1": str(latin1),
            "DATA_LATIN1": str(d1), "DATA_BADGZ": str(d2), "FILE": str(existing), "DIR": str(root / "adir"),
            **runs}


def _crafted_runs(root: Path, target: Path) -> dict[str, str]:
    """Run folders a careless or hostile user could hand to report/families (issue 42 §2)."""
    def run(name: str, files: dict[str, object]) -> str:
        for rel, content in files.items():
            (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / name / rel).write_text(json.dumps(content))
        return str(root / name)

    manifest = {"model": "m", "method": "attn", "amounts": ["0"], "tasks": ["fidelity"], "data_dir": None,
                "identity": {"options": {}, "importance": "cosine", "calib": None, "calib_samples": None,
                             "calib_len": None}}
    cell = {"amount": "0", "task": "fidelity", "kind": "fidelity", "metric": "m", "label": "dense", "n": 1}
    out = {"RUN_SWEEP_EMPTY": run("sweep-empty", {"sweep.json": {}}),
           "RUN_CELL_EMPTY": run("cell-empty", {"sweep.json": manifest, "cells/0--fidelity.json": {}}),
           "RUN_CELL_BADSCORE": run("cell-badscore", {"sweep.json": manifest,
                                                      "cells/0--fidelity.json": {**cell, "score": "<b>1</b>"}}),
           "RUN_NO_KEYS": run("no-keys", {"results.json": {"schema": "prunelens.paired/1"}}),
           "RUN_BAD_TYPE": run("bad-type", {"results.json": {
               "schema": "prunelens.advise/1", "model": {}, "use": "chat", "budget": 0.1,
               "n_prompts": "<script>alert(1)</script>", "recommendation": "r", "rows": []}}),
           "RUN_CELL_LIST": run("cell-list", {"sweep.json": manifest, "cells/0--fidelity.json": [cell]}),
           "RUN_NOT_OBJECT": run("not-object", {"results.json": ["prunelens.paired/1"]}),
           "RUN_SYMLINK_FIG": run("symlink-fig", {"results.json": {"schema": "prunelens.analysis/1"}})}
    (root / "symlink-fig" / "figures").mkdir()
    (root / "symlink-fig" / "figures" / "layerwise.png").symlink_to(target)
    return out


def _bad_configs(root: Path) -> dict[str, str]:
    """Malformed task configs (CFG_*, over one data file) and SHORT, a two-token text (issue 42 §5)."""
    d = root / "configs"
    d.mkdir()
    (d / "d.jsonl").write_text('{"q": "w3 w4", "a": "w5"}\n{"q": "w4", "a": "w6"}\n')
    gen = "kind: generate\ndata_files: d.jsonl\nprompt: '{{q}}'\ntarget: a\n"
    bad = {"IGNORE": "ignore: '(['", "GROUP": "extract: {regex: 'a(b)', group: 2}",
           "REGEX_NUMBER": "extract: {regex: 5}", "IGNORE_NUMBER": "ignore: [',', 5]", "FEWSHOT": "num_fewshot: two",
           "MAX_NEW": "max_new_tokens: lots", "UNTIL": "until: [Answer, 3]", "FLAG": "ignore_case: maybe",
           "SELECT": "extract: {regex: a, select: middle}", "TEMPLATE": "fewshot_target: '{{ a '",
           "CYCLE": "description: &a [*a]"}
    out = {f"CFG_{k}": str(_text(d / f"{k.lower()}.yaml", f"{gen}{v}\n")) for k, v in bad.items()}
    out["CFG_DATA_FILES"] = str(_text(d / "data_files.yaml", gen.replace("d.jsonl", "5")))
    out["SHORT"] = str(_text(root / "short.txt", "w3 w4\n"))
    (d / "mc.jsonl").write_text('{"q": "w3 w4", "opts": ["w5", "w6"], "a": 0}\n')
    out["CFG_MC"] = str(_text(d / "mc.yaml", "kind: multiple_choice\ndata_files: mc.jsonl\nprompt: '{{q}}'\n"
                                             "choices: opts\nanswer: a\n"))
    return out


def _other_tokenizer(path: Path) -> Path:
    """A candidate whose tokenizer has one token more than the base's."""
    save_tiny(path)
    tok = tiny_tokenizer()
    tok.add_tokens(["extra"])
    tok.save_pretrained(path)
    return path


def _quantised(path: Path, quantization_config: dict) -> Path:
    """A checkpoint whose config declares a quantisation (its weights are plain: it must not load)."""
    save_tiny(path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": quantization_config}))
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in
                                                         enumerate(CASES)])
def test_bad_input_is_one_line_and_leaves_nothing(argv: list[str], message: str, files: dict[str, str],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # default run directories would land here
    out = tmp_path / "out"
    rc = main([str(out) if a == "OUT" else files.get(a, a) for a in argv] + ["--quiet"] * _quiet(argv[0]))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "something was left behind"


def _quiet(command: str) -> int:
    return 0 if command in ("report", "prune", "families") else 1


def test_the_main_job_runs_prompt_sets_larger_than_a_batch(tiny_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "nine.txt"
    prompts.write_text("".join(f"w{i} w{i + 1} w{i + 2}\n" for i in range(3, 12)))
    rc = main(["analyze", "--model", str(tiny_dir), "--prompts", str(prompts), "--drop", "attn@1", "--steps", "2",
               "--batch-size", "2", "--out", str(tmp_path / "run"), "--quiet"])
    assert rc == 0
    assert "diverged" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["settings"]["n_prompts"] == 9


def test_overwrite_keeps_the_old_run_until_the_new_one_is_whole(tmp_path: Path) -> None:
    from prunelens.runs import write_run

    out = tmp_path / "run"
    write_run({"n": 1}, out, figures=lambda r, d: [], html=lambda r, f: "old")
    with pytest.raises(RuntimeError):
        write_run({"n": 2}, out, overwrite=True, figures=lambda r, d: [],
                  html=lambda r, f: (_ for _ in ()).throw(RuntimeError("killed mid-write")))
    assert (out / "report.html").read_text() == "old"  # the old run is intact
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # and no temporary is left
    write_run({"n": 3}, out, overwrite=True, figures=lambda r, d: [], html=lambda r, f: "new")
    assert (out / "report.html").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_temporaries_of_a_killed_run_are_cleaned_up(tmp_path: Path) -> None:
    from prunelens.runs import write_run

    dead = _dead_pid()
    (tmp_path / f".run.tmp-{dead}").mkdir()  # a killed analyze's half-written run
    (tmp_path / f".other.tmp-{dead}").mkdir()  # another run's: not ours to touch
    write_run({"n": 1}, tmp_path / "run", figures=lambda r, d: [], html=lambda r, f: "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{dead}", "run"]


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path: Path) -> None:
    """Only newlines end a JSONL row: U+2028, U+0085 and form feeds inside strings are text (MMLU
    has them; str.splitlines once split its rows)."""
    import gzip

    from prunelens.data import iter_jsonl, read_texts

    rows = [{"text": "a\u2028b"}, {"text": "c\x85d\x0ce"}]
    p = tmp_path / "x.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert [o for _, o in iter_jsonl(p)] == rows
    assert read_texts(p) == ["a\u2028b", "c\x85d\x0ce"]
