"""bench/teacher_check.py: the teacher's and the student's (the bundled MiniLM, embedder's own loader and encoder)
ranking of each record's labelled positive among its candidates, on records whose answers are known by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_teacher_and_student_rankings(tmp_path):
    records = [  # teacher right on the first, wrong on the second; the student (MiniLM) right on both
        {"query": "a cat sat on the mat", "pos": ["The cat is sitting on a mat."],
         "neg": ["Lattice QCD computes hadron masses.", "Stock markets fell in March."],
         "teacher_scores": [-0.5, -3.0, -2.0]},
        {"query": "how do vaccines train the immune system", "pos": ["Vaccines teach the immune system to "
                                                                     "recognise a pathogen."],
         "neg": ["The Eiffel tower is in Paris.", "Rainbows form by refraction."],
         "teacher_scores": [-2.0, -1.0, -3.0]},
    ]
    scored = tmp_path / "train.scored.json"
    scored.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "teacher_check.py"), str(scored)],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["records"] == 2 and result["candidates_mean"] == 3
    assert result["teacher_top1"] == 0.5 and result["teacher_mrr"] == 0.75  # ranks 1 and 2
    assert result["student_top1"] == 1.0 and result["student_mrr"] == 1.0
    assert -1 <= result["spearman_mean"] <= 1


def test_a_record_without_teacher_scores_names_the_file_and_line(tmp_path):
    scored = tmp_path / "mined.json"
    scored.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "teacher_check.py"), str(scored)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0
    assert f"{scored}:1: no teacher_scores" in run.stderr and "Traceback" not in run.stderr
