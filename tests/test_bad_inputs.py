"""Bad inputs, tried as a user would: every entry point run as a subprocess on each poisoned input.

Each case asserts: a non-zero exit; no traceback on stderr; the offending file (and line, where there is one) named;
and nothing created or changed under the run's output folder. The inputs are the sample data with one thing broken.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.conftest import ROOT

SAMPLE = os.path.join(ROOT, "embedder", "sample_data")
QA_TRAIN = os.path.join(SAMPLE, "qa", "train.json")
QA_TEST = os.path.join(SAMPLE, "qa", "test.json")
QA_CORPUS = os.path.join(SAMPLE, "qa", "corpus.json")
ENTRY_POINTS = ("train", "mine", "score", "evaluate")


def _lines(path: str, n: int = 3) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line for line in f if line.strip()][:n]


def _base(entry: str) -> list[str]:
    """Good JSON lines of the file each entry point reads (training records, or eval records)."""
    return _lines(QA_TEST if entry == "evaluate" else QA_TRAIN)


def _with(entry: str, line: int, **fields) -> bytes:
    """The base file with `fields` replaced in record `line` (1-based)."""
    lines = _base(entry)
    rec = json.loads(lines[line - 1])
    rec.update(fields)
    lines[line - 1] = json.dumps(rec, allow_nan=True) + "\n"
    return "".join(lines).encode()


def _keys(entry: str, line: int) -> int:
    rec = json.loads(_base(entry)[line - 1])
    return len(rec["pos"]) + len(rec["neg"])


@dataclass
class Case:
    name: str
    content: object  # bytes, a callable(entry) -> bytes, "dir" (a folder), or None (the file is missing)
    line: int | None  # the line the message must name; None: no line
    entries: tuple[str, ...] = ENTRY_POINTS
    args: tuple[str, ...] = ()  # extra overrides
    needs: str | None = None  # a phrase the message must contain (lower case)
    named: str | None = None  # what the message must name instead of the input file ({tmp}: the test's folder)


def _truncated(entry: str) -> bytes:
    lines = _base(entry)
    return ("".join(lines[:2]) + lines[2][: len(lines[2]) // 2]).encode()


def _bad_utf8(entry: str) -> bytes:
    lines = _base(entry)
    return (lines[0] + lines[1]).encode() + lines[2].encode().replace(b'"query": "', b'"query": "\xff\xfe', 1)


def _array(entry: str) -> bytes:
    return json.dumps([json.loads(x) for x in _base(entry)]).encode()


def _huge(entry: str) -> bytes:
    return _with(entry, 2, query="word " * 1_000_000)  # a 5 MB query


CASES = [
    Case("truncated-line", _truncated, 3),
    Case("invalid-utf8", _bad_utf8, 3, needs="utf-8"),
    Case("empty-file", b"", None, needs="empty"),
    Case("empty-array", b"[]\n", 1),
    Case("json-array", _array, 1),
    Case("query-not-text", lambda e: _with(e, 2, query=5), 2, needs="query"),
    Case("teacher-nan", lambda e: _with(e, 2, teacher_scores=[float("nan")] * _keys(e, 2)), 2,
         entries=("train",), needs="teacher_scores"),
    Case("teacher-infinity", lambda e: _with(e, 1, teacher_scores=[float("inf")] * _keys(e, 1)), 1,
         entries=("train",), needs="teacher_scores"),
    Case("pos-index-out-of-range", lambda e: _with(e, 2, pos_index=[10 ** 6]), 2, entries=("evaluate",),
         needs="pos_index"),
    Case("pos-index-negative", lambda e: _with(e, 2, pos_index=[-3]), 2, entries=("evaluate",), needs="pos_index"),
    Case("missing-file", None, None, needs="not found"),
    Case("directory", "dir", None, needs="directory"),
    Case("unknown-key", lambda e: "".join(_base(e)).encode(), None, args=("batch_sise=3",), needs="unknown config key"),
    Case("missing-model", lambda e: "".join(_base(e)).encode(), None, args=("{model}=/no/such/model",),
         needs="does not exist", named="/no/such/model"),
    Case("model-not-on-hub-offline", lambda e: "".join(_base(e)).encode(), None,
         args=("{model}=nobody-xyz/no-such-model",), needs="cannot be reached", named="nobody-xyz/no-such-model"),
    Case("corrupt-checkpoint", lambda e: "".join(_base(e)).encode(), None, entries=("train",),
         args=("ckpt_path={tmp}/bad.ckpt",), needs="corrupt", named="{tmp}/bad.ckpt"),
    Case("output-dir-under-a-file", lambda e: "".join(_base(e)).encode(), None,
         args=("output_dir={tmp}/a-file/out",), needs="is a file, not a folder", named="{tmp}/a-file"),
]


def _command(entry: str, data: str, out: str) -> list[str]:
    common = [f"hydra.run.dir={out}/hydra", "hydra.output_subdir=null"]
    if entry == "train":
        return [sys.executable, "train.py", "task=qa", f"train_data=[{data}]", "eval={}", "model=tiny_bert",
                "trainer=cpu", "trainer.max_steps=1", "evaluate_before=false", f"output_dir={out}/run",
                "logger=csv", *common]
    if entry == "mine":
        return [sys.executable, "mine.py", f"input_data={data}", f"corpus={QA_CORPUS}", "model=tiny_bert",
                f"output_dir={out}/run", "save_to_output=true", *common]
    if entry == "score":
        return [sys.executable, "score.py", f"input_data={data}", "lm=tiny", f"output_dir={out}/run", *common]
    return [sys.executable, "-m", "embedder.evaluate", f"eval_data={data}", f"corpus={QA_CORPUS}", "model=tiny_bert",
            "instruction_kind=qa", f"output_dir={out}/run", *common]


def _snapshot(folder: str) -> dict[str, float]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            out[p] = os.path.getmtime(p)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case,entry", [(c, e) for c in CASES for e in ENTRY_POINTS if e in c.entries],
                         ids=[f"{c.name}-{e}" for c in CASES for e in ENTRY_POINTS if e in c.entries])
def test_bad_input_gives_one_clear_message(tmp_path, entry, case):  # only the pairs a case applies to: no skips
    data = str(tmp_path / "data" / "input.json")
    os.makedirs(os.path.dirname(data))
    if case.content == "dir":
        os.makedirs(data)
    elif case.content is not None:
        content = case.content(entry) if callable(case.content) else case.content
        with open(data, "wb") as f:
            f.write(content)
    out = str(tmp_path / "out")
    os.makedirs(os.path.join(out, "run"))
    with open(os.path.join(out, "run", "earlier-good-output.txt"), "w") as f:
        f.write("keep me\n")
    before = _snapshot(os.path.join(out, "run"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "bad.ckpt", "wb") as f:
        f.write(b"PK\x03\x04 not really a checkpoint")
    (tmp_path / "a-file").write_text("a file, not a folder\n")
    model_key = "lm.model_name_or_path" if entry == "score" else "model.model_name_or_path"
    args = [a.replace("{model}", model_key).replace("{tmp}", str(tmp_path)) for a in case.args]
    cmd = _command(entry, data, out) + args
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    err = proc.stderr
    report = os.environ.get("EMBEDDER_BAD_INPUT_REPORT")  # a file: collect case -> message for the docs table
    if report:
        first = next((x for x in err.splitlines() if x.startswith("error:") or "Unknown config key" in x), err[-200:])
        with open(report, "a", encoding="utf-8") as f:
            f.write(json.dumps({"case": case.name, "entry": entry, "message": first.replace(str(tmp_path), "<tmp>")})
                    + "\n")
    assert proc.returncode != 0, f"{entry} exited 0 on {case.name}:\n{err[-3000:]}"
    assert "Traceback" not in err, f"{entry} printed a traceback on {case.name}:\n{err[-3000:]}"
    named = case.named.replace("{tmp}", str(tmp_path)) if case.named else data
    if case.needs != "unknown config key":
        assert named in err, f"{entry} did not name {named} on {case.name}:\n{err[-3000:]}"
    if case.line is not None:
        assert f"line {case.line}" in err, f"{entry} did not name line {case.line} on {case.name}:\n{err[-3000:]}"
    if case.needs:
        assert case.needs in err.lower(), f"{entry}: no '{case.needs}' in the message on {case.name}:\n{err[-3000:]}"
    assert _snapshot(os.path.join(out, "run")) == before, f"{entry} changed its output folder on {case.name}"


@pytest.mark.parametrize("exc,want", [
    (OSError(28, "No space left on device", "/out/emb.npy"), "/out/emb.npy: no space left on the device"),
    (PermissionError(13, "Permission denied", "/ro/out"), "/ro/out: permission denied"),
    (IsADirectoryError(21, "Is a directory", "/data/x.json"), "/data/x.json: is a directory"),
    (OSError(30, "Read-only file system", "/mnt/ro/a"), "/mnt/ro/a: the filesystem is read-only"),
])
def test_os_errors_become_one_line_naming_the_file(exc, want, capsys):
    from embedder.errors import ReportedInputErrors

    with pytest.raises(SystemExit) as e:
        with ReportedInputErrors():
            raise exc
    assert e.value.code == 1
    assert capsys.readouterr().err.startswith(f"error: {want}")


def test_a_data_error_wrapped_by_hydra_instantiate_is_reported_cleanly(capsys):
    """hydra.utils.instantiate wraps what a constructor raises (a model that cannot be loaded) in its own
    InstantiationException; the wrapper reports the cause."""
    from hydra.errors import InstantiationException

    from embedder.errors import DataError, ReportedInputErrors

    with pytest.raises(SystemExit):
        with ReportedInputErrors():
            try:
                raise DataError("cannot load the model", path="/no/such/model")
            except DataError as cause:
                raise InstantiationException("Error in call to target 'DualEncoder'") from cause
    assert capsys.readouterr().err == "error: /no/such/model: cannot load the model\n"


def test_other_errors_keep_their_traceback():
    from embedder.errors import ReportedInputErrors

    with pytest.raises(KeyError):
        with ReportedInputErrors():
            raise KeyError("a bug")


BAD_VALUES = [  # (command, override): each must stop at start with one line naming the key
    ("train", "data.batch_size=-1"), ("train", "data.batch_size=0"), ("train", "data.group_size=0"),
    ("train", "data.num_workers=-2"), ("train", "loss.temperature=0"), ("train", "loss.temperature=-0.5"),
    ("train", "optimizer.lr=abc"), ("train", "optimizer.lr=0"), ("train", "loss.combine_rule=bogus"),
    ("train", "trainer.max_epochs=-5"), ("train", "model.pooling=bogus"), ("train", "query_max_length=0"),
    ("train", "key_max_length=-3"), ("train", "warmup_ratio=1.5"), ("train", "weight_decay=-1"),
    ("train", "merge_base_weight=1.5"), ("train", "merge_base_weight=[0,0.2,0.2]"), ("train", "merge_base_weight=[1]"),
    ("train", "loss.gradcache_mini_batch=0"), ("train", "model.pooling=max"),
    ("train", "export_state=middle"), ("train", "data.batch_size=eight"), ("train", "trainer.max_steps=-7"),
    ("train", "model.bidirectional=maybe"), ("train", "export_lora=zip"), ("train", "export_lora=adapter"),
    ("train", "loss.directions=[doc_to_query]"), ("train", "loss.directions=[query_to_doc,query_to_passage]"),
    ("mine", "hits=0"), ("mine", "max_neg_num=-1"), ("evaluate", "hits=-1"), ("evaluate", "retriever.batch_size=0"),
]


@pytest.mark.parametrize("entry,override", BAD_VALUES, ids=[f"{e}-{o}" for e, o in BAD_VALUES])
def test_a_bad_config_value_is_one_line_naming_the_key(tmp_path, entry, override):
    """Negative, zero, wrong type, unknown choice, out of range: exit 1 before any data or model is read, no
    traceback, the key and what it allows named."""
    data = str(tmp_path / "input.json")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(_base(entry))
    cmd = _command(entry, data, str(tmp_path / "out")) + [override]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    key = override.split("=")[0]
    assert proc.returncode == 1, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "Error in call to target" not in proc.stderr, proc.stderr[-3000:]
    assert f"field '{key}'" in proc.stderr and f"{key} must be" in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "out" / "run"), "a run folder was made before the check"
