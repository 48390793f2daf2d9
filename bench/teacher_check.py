"""Is an LM teacher worth distilling? Its ranking of each query's candidates against the student's, before training.

    python score.py input_data=<out>/data/mine-dense/train.neg.dense.json output_dir=/tmp/teach \\
        default_record_kind=beir max_candidates=8 max_records=60          # what beir.teacher.lm=smollm2 scores
    python bench/teacher_check.py /tmp/teach/train.neg.dense.scored.smollm2.json          # the bundled MiniLM
    python bench/teacher_check.py <scored file> --model <a trained export>                # any student

For every scored record (its positives, then its first negatives, as `beir.teacher` scores them): does the teacher
score a labelled positive above every candidate negative (top-1), the reciprocal rank of the best positive (MRR),
the same for the student's cosine scores (embedder's own loader and `encode_texts`), and the Spearman correlation
of the two score lists. The candidates were mined by a dense model with a margin filter, so they sit below the
positive for that model by construction: the comparison favours a student that mined them; a teacher worth its
cost should still place the labelled positive first far more often than chance (1 / candidates).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rank_of_best_positive(scores: list[float], n_pos: int) -> int:
    """1 + the number of negatives scored above the best positive (ties count for the positive)."""
    best = max(scores[:n_pos])
    return 1 + sum(s > best for s in scores[n_pos:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scored", help="a score.py output (records with pos, neg, teacher_scores)")
    parser.add_argument("--model", default=None, help="the student: a model folder (default: the bundled MiniLM)")
    parser.add_argument("--key-template", default="{text}", help="only for records whose keys are dicts")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from scipy.stats import spearmanr

    from embedder.config import compose
    from embedder.retrieval.encode.model import load_encoder

    records = []  # a bench of a few hundred records: read (and checked) whole before the model loads
    with open(args.scored, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    sys.exit(f"{args.scored}:{line_no}: not a JSON record ({e.msg}): pass a score.py output")
                if not records[-1].get("teacher_scores"):
                    sys.exit(f"{args.scored}:{line_no}: no teacher_scores: run score.py on the mined file first")
    if not records:
        sys.exit(f"{args.scored}: no records")
    encoder = load_encoder(compose("train", ["model=minilm"]).model, args.model)
    keys = [[k if isinstance(k, str) else args.key_template.format(**k)
             for k in (r["pos"] + r["neg"])[:len(r["teacher_scores"])]] for r in records]
    # one encode call per side (length-sorted batches over every record), not two per record
    q_emb = encoder.encode_texts([r["query"] for r in records], kind="query")  # (N, d)
    k_emb = encoder.encode_texts([k for ks in keys for k in ks], kind="key")  # (sum C, d)
    rows, start = [], 0
    for i, r in enumerate(records):
        teacher = r["teacher_scores"]
        k = k_emb[start:start + len(keys[i])]  # (C, d)
        start += len(keys[i])
        student = (k @ q_emb[i]).tolist()  # (C,) cosine: the encoder normalises
        n_pos = min(len(r["pos"]), len(teacher))
        rows.append((rank_of_best_positive(teacher, n_pos), rank_of_best_positive(student, n_pos),
                     spearmanr(teacher, student).statistic, len(teacher)))
    n = len(rows)
    out = {"records": n, "candidates_mean": statistics.mean(r[3] for r in rows),
           "teacher_top1": sum(r[0] == 1 for r in rows) / n, "teacher_mrr": statistics.mean(1 / r[0] for r in rows),
           "student_top1": sum(r[1] == 1 for r in rows) / n, "student_mrr": statistics.mean(1 / r[1] for r in rows),
           "spearman_mean": statistics.mean(r[2] for r in rows if r[2] == r[2])}  # NaN (constant scores) left out
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
