"""Bad input fails with one clear error naming file, line and field; by-design drops are counted."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from embedder.data.train_files import load_train_file
from embedder.errors import DataError
from embedder.paths import resolve_files, resolve_path
from embedder.record_kinds import build_record_kinds

TASKS_CFG = {
    "qa": {"loss": {"contrastive_weight": 0.0, "distill_weight": 1.0, "stable_distill": True}},
    "tool": {"loss": {"contrastive_weight": 0.2, "distill_weight": 0.0}},
    "lrlm": {"sampling": {"select_positive": "teacher", "teacher_scores_margin": 0.1, "max_sample_num": 2},
             "loss": {"contrastive_weight": 0.0, "distill_weight": 1.0, "teacher_temperature": 0.1}},
}


@pytest.fixture
def tasks():
    return build_record_kinds(TASKS_CFG, group_size=4)


def write(tmp_path, rows, name="train.json"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


GOOD_TOOL = {"query": "q", "pos": ["p"], "neg": ["a", "b"], "task": "tool"}


def test_malformed_json_names_file_and_line(tmp_path, tasks):
    path = write(tmp_path, [GOOD_TOOL, '{"query": "q", "pos": ['])
    with pytest.raises(DataError, match=r"train.json, line 2: malformed JSON"):
        load_train_file(path, tasks)


def test_missing_query(tmp_path, tasks):
    path = write(tmp_path, [GOOD_TOOL, GOOD_TOOL, {"pos": ["p"], "neg": ["n"], "task": "tool"}])
    with pytest.raises(DataError, match=r"line 3, field 'query': missing 'query'"):
        load_train_file(path, tasks)


def test_pos_and_neg_both_empty(tmp_path, tasks):
    path = write(tmp_path, [{"query": "q", "pos": [], "neg": [], "task": "tool"}])
    with pytest.raises(DataError, match=r"line 1, field 'pos': 'pos' and 'neg' are both empty"):
        load_train_file(path, tasks)


def test_teacher_scores_length_mismatch(tmp_path, tasks):
    path = write(tmp_path, [{"query": "q", "pos": ["p"], "neg": ["a", "b"], "teacher_scores": [1.0, 2.0], "task": "qa"}])
    with pytest.raises(DataError, match=r"field 'teacher_scores': 2 teacher_scores for 3 keys in pos \+ neg"):
        load_train_file(path, tasks)


def test_history_teacher_scores_mismatch(tmp_path):
    tasks = build_record_kinds({"chat": {"sampling": {"select_positive": "teacher"},
                                          "loss": {"contrastive_weight": 0, "distill_weight": 1}}}, 4)
    path = write(tmp_path, [{"query": "q", "history": ["a", "b", "c"], "teacher_scores": [1.0], "task": "chat"}])
    with pytest.raises(DataError, match=r"1 teacher_scores for 3 keys in history"):
        load_train_file(path, tasks)


def test_distillation_without_teacher_scores_points_to_score_py(tmp_path, tasks):
    path = write(tmp_path, [{"query": "q", "pos": ["p"], "neg": ["a"], "task": "qa"}])
    with pytest.raises(DataError) as e:
        load_train_file(path, tasks)
    msg = str(e.value)
    assert "enables distillation" in msg and "score.py" in msg and "contrastive" in msg and "line 1" in msg


def test_unknown_task_lists_valid_ones(tmp_path, tasks):
    path = write(tmp_path, [{"query": "q", "pos": ["p"], "neg": ["a"], "task": "weather"}])
    with pytest.raises(DataError, match=r"(?s)unknown task 'weather'.*valid tasks: lrlm, qa, tool"):
        load_train_file(path, tasks)


def test_drops_are_counted_not_silent(tmp_path, tasks):
    rows = [{"query": f"q{i}", "pos": [], "neg": ["a", "b", "c"], "task": "lrlm",
             "teacher_scores": [-2.0, -2.5, -2.3] if i % 2 else [-2.0, -2.01, -2.05]} for i in range(6)]
    rows.append({"query": "q", "pos": [], "neg": ["only"], "task": "lrlm", "teacher_scores": [-1.0]})
    path = write(tmp_path, rows)
    f = load_train_file(path, tasks, seed=0)
    assert f.total == 7
    # 3 records span < 0.1 (the single-key one spans 0), 3 kept -> capped to 2 by max_sample_num
    assert f.dropped == Counter({"teacher_scores_margin": 4, "max_sample_num": 1})
    assert len(f.records) == 2


def test_no_negatives_is_counted(tmp_path, tasks):
    path = write(tmp_path, [GOOD_TOOL, {"query": "q", "pos": ["p"], "neg": [], "task": "tool"}])
    f = load_train_file(path, tasks)
    assert f.dropped == Counter({"no negatives": 1}) and len(f.records) == 1


def test_duplicate_dataset_names_get_suffixes(tmp_path, tasks):
    path = write(tmp_path, [GOOD_TOOL])
    names = Counter()
    a = load_train_file(path, tasks, taken_names=names)
    b = load_train_file(path, tasks, taken_names=names)
    assert (a.name, b.name) == (tmp_path.name, f"{tmp_path.name}_1")


def test_resolve_prefix_glob_and_missing(tmp_path):
    (tmp_path / "qa" / "nq").mkdir(parents=True)
    for n in ("train.json", "dev.json"):
        (tmp_path / "qa" / "nq" / n).write_text("{}\n")
    assert resolve_path("llm-embedder:qa/nq/train.json", str(tmp_path)) == str(tmp_path / "qa/nq/train.json")
    assert resolve_path("plain/file.json", str(tmp_path)) == "plain/file.json"
    got = resolve_files(["llm-embedder:qa/nq/*.json", str(tmp_path / "qa/nq/train.json")], str(tmp_path))
    assert got == [str(tmp_path / "qa/nq/dev.json"), str(tmp_path / "qa/nq/train.json"), str(tmp_path / "qa/nq/train.json")]
    with pytest.raises(FileNotFoundError, match=r"resolved it to '.*qa/msmarco/train.json' with data_root="):
        resolve_files("llm-embedder:qa/msmarco/train.json", str(tmp_path), what="train_data")


def test_train_py_reports_bad_input_without_traceback(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    bad = write(tmp_path, [{"query": "q", "pos": ["p"], "neg": ["a"], "task": "qa"}])
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "task=msmarco", f"train_data=[{bad}]",
                           f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1
    assert "error: " in proc.stderr and "line 1, field 'teacher_scores'" in proc.stderr and "score.py" in proc.stderr
    assert "Traceback" not in proc.stderr
