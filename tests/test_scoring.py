"""LM scoring: exact masked log-likelihoods, padding/batch invariance, shard + resume, validation before model load.

A tiny random Llama with a byte-level BPE tokenizer (built offline, embedder.scoring.tiny_lm) does the arithmetic
checks; the bundled SmolLM2 runs on the reference toy qa file as a sanity check (slow).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from embedder.errors import DataError
from tests.conftest import ROOT, compose, read_jsonl, toy_path

QA = "Knowledge: {key}\n\nQuestion: {query}\n\nAnswer: {answer}"


# ---------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> str:
    from embedder.scoring.tiny_lm import build_tiny_lm

    return build_tiny_lm(str(tmp_path_factory.mktemp("tiny-lm")))


@pytest.fixture(scope="session")
def tiny_scorer(tiny_lm):
    from embedder.scoring.lm_scorer import LMScorer

    return LMScorer(tiny_lm, dtype="float32", device="cpu", key_max_length=512)


def write_jsonl(path, records) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def score_cfg(tiny_lm: str, files, extra=()):
    files = [files] if isinstance(files, str) else list(files)
    return compose(["lm=tiny", f"lm.model_name_or_path={tiny_lm}", f"input_data=[{','.join(files)}]", *extra],
                   config_name="score")


def qa_records(n=5):
    """Small qa records: several answers on some, varied lengths, one without query_id."""
    recs = []
    for i in range(n):
        recs.append({"query": f"what does the fox number {i} jump over?", "query_id": 100 + i,
                     "answers": [f"The fox jumps over dog {i}.", f"Over the lazy dog {i}."][: 1 + i % 2],
                     "pos": [f"The quick brown fox {i} jumps over the lazy dog."],
                     "neg": [f"Numbers {j} " * (1 + j) for j in range(i + 1)], "task": "qa"})
    if n > 2:
        del recs[2]["query_id"]
    return recs


def direct_score(model, tok, text: str, answer_start: int, normalize: str = "mean") -> float:
    """The masked mean log-likelihood written out for one unpadded sequence, independent of LMScorer."""
    import torch

    enc = tok(text, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"])
    mask = torch.tensor([end > answer_start for _, end in enc["offset_mapping"]])
    mask[0] = False
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0].float(), -1)
    token_lp = logp[:-1].gather(-1, ids[1:, None]).squeeze(-1)
    m = mask[1:]
    total = float(token_lp[m].sum())
    return total / int(m.sum()) if normalize == "mean" else total


# ------------------------------------------------------------------------------------------------ exact arithmetic
def test_scores_equal_direct_masked_mean_loglik(tmp_path, tiny_lm, tiny_scorer):
    from embedder.scoring.run import run_score

    recs = qa_records()
    path = write_jsonl(tmp_path / "qa.json", recs)
    res = run_score(score_cfg(tiny_lm, path, ["answer_choice=first", "batch_size=3"]))
    (out,) = res["files"]
    assert out["status"] == "scored" and out["output"] == str(tmp_path / "qa.scored.tiny.json")
    scored = read_jsonl(out["output"])
    model, tok = tiny_scorer.model, tiny_scorer.tokenizer
    for rec, got in zip(recs, scored):
        keys = rec["pos"] + rec["neg"]
        assert len(got["teacher_scores"]) == len(keys)
        for key, score in zip(keys, got["teacher_scores"]):
            # the reference's qa f-string, written out by hand
            a = rec["answers"][0].strip()
            text = f"Knowledge: {key.strip()}\n\nQuestion: {rec['query'].strip()}\n\nAnswer: {a}"
            want = direct_score(model, tok, text, len(text) - len(a))
            assert score == pytest.approx(want, abs=2e-5)
            assert score < 0


def test_sum_normalisation_is_mean_times_answer_tokens(tiny_scorer):
    from embedder.scoring.lm_scorer import Job
    from embedder.scoring.templates import Template

    t = Template("qa", QA, strip=True)
    jobs = [Job(t, r, k, r["answers"][0]) for r in qa_records() for k in r["pos"] + r["neg"]]
    enc = tiny_scorer.encode(jobs)
    mean = tiny_scorer.score_encoded(enc)
    try:
        tiny_scorer.normalize = "sum"
        total = tiny_scorer.score_encoded(enc)
    finally:
        tiny_scorer.normalize = "mean"
    np.testing.assert_allclose(total, mean * np.array([e.n_answer for e in enc]), rtol=1e-5)
    batches: list[int] = []  # score() reports each batch (the scoring progress line advances inside a part)
    np.testing.assert_allclose(tiny_scorer.score(jobs, batches.append), mean, rtol=1e-6)
    assert sum(batches) == len(jobs) and len(batches) == len(tiny_scorer.batches(enc, packed=tiny_scorer.run_packed()))


@pytest.mark.parametrize("packed", ["true", "false"])
def test_padding_and_batching_do_not_change_scores(tiny_scorer, packed):
    """Every batch layout (one per batch, all in one with heavy padding, token-budget batches, reversed order), packed
    into one padding-free row (grouped-query causal attention per input) and right-padded."""
    from embedder.scoring.lm_scorer import Job
    from embedder.scoring.templates import Template

    t = Template("qa", QA, strip=True)
    recs = qa_records(6) + [{"query": "q" * 3, "answers": ["x"], "pos": ["short"], "neg": []},
                            {"query": "long " * 60, "answers": ["a much longer answer " * 5], "pos": ["k " * 80], "neg": []}]
    jobs = [Job(t, r, k, r["answers"][-1]) for r in recs for k in r["pos"] + r["neg"]]
    enc = tiny_scorer.encode(jobs)
    lengths = [len(e.input_ids) for e in enc]
    assert max(lengths) > 3 * min(lengths)  # real padding happens in the one-batch layout
    s = tiny_scorer
    old = (s.batch_size, s.max_tokens_per_batch, s.packed)
    s.packed = packed
    assert s.run_packed() == (packed == "true")
    assert s.model.config.num_key_value_heads < s.model.config.num_attention_heads  # grouped-query attention
    try:
        results = {}
        for name, bs, budget in [("single", 1, None), ("one-batch", 10_000, None), ("b3", 3, None),
                                 ("budget", 64, 600)]:
            s.batch_size, s.max_tokens_per_batch = bs, budget
            results[name] = s.score_encoded(enc)
            if name == "one-batch":
                assert len(s.batches(enc)) == 1
        s.batch_size, s.max_tokens_per_batch = 4, None
        results["reversed"] = s.score_encoded(enc[::-1])[::-1]
    finally:
        s.batch_size, s.max_tokens_per_batch, s.packed = old
    for name, got in results.items():
        np.testing.assert_allclose(got, results["single"], atol=1e-5, err_msg=name)
    assert np.ptp(results["single"]) > 0.05  # the candidates really get different scores


def test_packed_batches_count_real_tokens_and_equal_padded_scores(tiny_scorer):
    """A packed batch is filled up to the budget in real tokens (a padded one in longest x count), and the two layouts
    score alike; the packed call builds no (T, T) mask."""
    from embedder.modeling import unpadded
    from embedder.scoring.lm_scorer import Encoded

    s = tiny_scorer
    enc = [Encoded([1] + [5 + i % 7] * n, 2) for i, n in enumerate([90, 10, 10, 10, 10, 10, 10])]
    old = (s.batch_size, s.max_tokens_per_batch)
    try:
        s.batch_size, s.max_tokens_per_batch = 100, 160
        assert [len(b) for b in s.batches(enc, packed=True)] == [7]  # 91 + 6 x 11 = 157 real tokens
        assert [len(b) for b in s.batches(enc, packed=False)] == [1, 6]  # 91 x 2 > 160 padded tokens
        packed, padded = s._answer_logp_packed(enc), s._answer_logp_padded(enc)
    finally:
        s.batch_size, s.max_tokens_per_batch = old
    np.testing.assert_allclose(packed, padded, atol=1e-4)
    assert unpadded._mask(attention_mask=None, batch_size=1, q_length=157, kv_length=157) is None


def test_packed_true_on_an_unsupported_architecture_says_so(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from embedder.scoring.lm_scorer import LMScorer
    from embedder.scoring.tiny_lm import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="packed=true: .*gpt2.*set packed=auto or false"):
        LMScorer(str(tmp_path), packed="true", device="cpu")
    auto = LMScorer(str(tmp_path), packed="auto", device="cpu")
    from embedder.scoring.lm_scorer import Encoded

    scores = auto.score_encoded([Encoded([1, 5, 6, 7], 2), Encoded([1, 8], 1)])
    assert not auto.run_packed() and scores.shape == (2,) and np.isfinite(scores).all()


def test_answer_tokens_cover_exactly_the_answer(tiny_scorer):
    from embedder.scoring.lm_scorer import Job
    from embedder.scoring.templates import Template

    tok = tiny_scorer.tokenizer
    for template, rec in [(Template("qa", QA, strip=True), {"query": " q? "}),
                          (Template("chat", "{key}\nSpeaker 1: {query}\nSpeaker 2: {answer}"), {"query": "hi"}),
                          (Template("lrlm", "{key}\n{context}{query}{answer}", defaults={"context": ""}),
                           {"query": "the begin"})]:
        for answer in ["ning of it", "The fox.", " spaced"]:
            (e,) = tiny_scorer.encode([Job(template, rec, "some key", answer)])
            text = template.render(rec, "some key", answer).text
            decoded = tok.decode(e.input_ids[-e.n_answer:])
            want = answer.strip() if template.strip else answer
            # the scored tokens decode to the answer, plus at most the separator glued to its first token
            assert decoded.endswith(want) and len(decoded) - len(want) <= 1, (decoded, want)
            assert text.endswith(want)


def test_answer_choice_seeded_first_and_mean(tmp_path, tiny_lm):
    from embedder.scoring.records import choose_answers
    from embedder.scoring.run import run_score

    answers = ["one answer", "a second answer", "third answer here"]
    picks = [choose_answers(answers, "seeded", 42, i)[0] for i in range(30)]
    assert picks == [choose_answers(answers, "seeded", 42, i)[0] for i in range(30)]  # reproducible
    assert len(set(picks)) == 3 and picks != [choose_answers(answers, "seeded", 7, i)[0] for i in range(30)]
    rec = {"query": "q", "answers": answers, "pos": ["p one"], "neg": ["n one", "n two"], "task": "qa"}
    per_answer = []
    for a in answers:
        path = write_jsonl(tmp_path / f"a{len(per_answer)}" / "x.json", [{**rec, "answers": [a]}])
        per_answer.append(read_jsonl(run_score(score_cfg(tiny_lm, path))["files"][0]["output"])[0]["teacher_scores"])
    path = write_jsonl(tmp_path / "all" / "x.json", [rec])
    mean = read_jsonl(run_score(score_cfg(tiny_lm, path, ["answer_choice=mean"]))["files"][0]["output"])[0]
    np.testing.assert_allclose(mean["teacher_scores"], np.mean(per_answer, axis=0), atol=2e-6)
    seeded = read_jsonl(run_score(score_cfg(tiny_lm, path, ["answer_choice=seeded", "overwrite=true"]))
                        ["files"][0]["output"])[0]
    assert seeded["teacher_scores"] == per_answer[answers.index(choose_answers(answers, "seeded", 42, 0)[0])]


# ---------------------------------------------------------------------------------------------- shards and resume
def _toy_qa_plus(tmp_path):
    toy = read_jsonl(toy_path("qa"))[:4]
    return write_jsonl(tmp_path / "in" / "train.json", toy + qa_records())


def test_shards_and_resume_give_the_identical_file(tmp_path, tiny_lm, monkeypatch):
    from embedder.scoring import lm_scorer
    from embedder.scoring.run import run_score

    src = _toy_qa_plus(tmp_path)
    common = ["part_size=2", "max_candidates=6", "batch_size=5"]
    ref = run_score(score_cfg(tiny_lm, src, [*common, f"output_dir={tmp_path}/one"]))["files"][0]
    want = open(ref["output"], "rb").read()
    n_parts = json.load(open(ref["meta"]))["parts"]
    assert n_parts == 5 and not os.path.exists(ref["output"][: -len(".json")] + ".parts")

    # two shard jobs: the first leaves a partial cache, the second finishes and writes the file
    out = f"output_dir={tmp_path}/shards"
    first = run_score(score_cfg(tiny_lm, src, [*common, out, "num_shards=2", "shard_id=0"]))["files"][0]
    assert first["status"] == "partial" and not os.path.exists(first["output"])
    second = run_score(score_cfg(tiny_lm, src, [*common, out, "num_shards=2", "shard_id=1"]))["files"][0]
    assert second["status"] == "scored" and open(second["output"], "rb").read() == want

    # a crash after two parts, then a rerun that scores only the rest
    calls = {"n": 0}
    real = lm_scorer.LMScorer.score_encoded

    def crashing(self, encoded, on_batch=None):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("simulated crash")
        return real(self, encoded, on_batch)

    monkeypatch.setattr(lm_scorer.LMScorer, "score_encoded", crashing)
    out = f"output_dir={tmp_path}/crash"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_score(score_cfg(tiny_lm, src, [*common, out]))
    parts_dir = tmp_path / "crash" / "train.scored.tiny.parts"
    assert len(list(parts_dir.glob("part-*.json"))) == 2 and not (tmp_path / "crash" / "train.scored.tiny.json").exists()
    calls["n"] = -100  # no more crashes; count the parts scored by the rerun
    done = run_score(score_cfg(tiny_lm, src, [*common, out]))["files"][0]
    assert calls["n"] == -100 + n_parts - 2
    assert open(done["output"], "rb").read() == want and not parts_dir.exists()

    # a finished file is not redone (no model is even loaded); other settings need overwrite=true
    monkeypatch.setattr(lm_scorer.LMScorer, "__init__", _no_model)
    again = run_score(score_cfg(tiny_lm, src, [*common, out]))["files"][0]
    assert again["status"] == "done"
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run_score(score_cfg(tiny_lm, src, [*common, out, "normalize=sum"]))


def test_torchrun_ranks_merge_in_order(tmp_path, tiny_lm, monkeypatch):
    """Two torchrun ranks (run one after the other here): rank 1 caches its parts, rank 0 scores its own and merges."""
    from embedder.scoring.run import run_score

    src = _toy_qa_plus(tmp_path)
    common = ["part_size=3", "max_candidates=5"]
    want = open(run_score(score_cfg(tiny_lm, src, [*common, f"output_dir={tmp_path}/one"]))["files"][0]["output"],
                "rb").read()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_score(score_cfg(tiny_lm, src, [*common, f"output_dir={tmp_path}/ddp"])) == {"files": [], "rank": 1}
    monkeypatch.setenv("RANK", "0")
    (res,) = run_score(score_cfg(tiny_lm, src, [*common, f"output_dir={tmp_path}/ddp"]))["files"]
    assert res["status"] == "scored" and open(res["output"], "rb").read() == want


@pytest.mark.slow
def test_spawned_workers_give_the_identical_file(tmp_path, tiny_lm):
    from embedder.scoring.run import run_score

    src = _toy_qa_plus(tmp_path)
    common = ["part_size=3", "max_candidates=4"]
    one = run_score(score_cfg(tiny_lm, src, [*common, f"output_dir={tmp_path}/one"]))["files"][0]["output"]
    two = run_score(score_cfg(tiny_lm, src, [*common, f"output_dir={tmp_path}/two", "devices=2"]))["files"][0]
    assert two["status"] == "scored" and open(two["output"], "rb").read() == open(one, "rb").read()


# -------------------------------------------------------------------------------------------- output and meta
def test_output_records_unchanged_plus_aligned_scores_and_meta(tmp_path, tiny_lm):
    from embedder.scoring.run import run_score

    chat = [{"history": ["Speaker 1: hi\nSpeaker 2: hello", "Speaker 1: where?\nSpeaker 2: at home"],
             "query": "Are you home?", "answers": ["Yes, I am."], "task": "chat", "teacher_scores": [0.0, 1.0]}]
    lrlm = [{"query_id": 3, "query": "passage de l'onde ner", "answers": ["veuse et la suite"], "pos": [],
             "neg": ["ien est sous-tendu", "un autre morceau"], "context": "", "task": "lrlm"}]
    qa = [{k: v for k, v in r.items() if k != "task"} for r in qa_records(3)]
    files = [write_jsonl(tmp_path / "chat" / "train.json", chat), write_jsonl(tmp_path / "lrlm" / "train.json", lrlm),
             write_jsonl(tmp_path / "qa" / "train.neg.bge.json", qa)]
    res = run_score(score_cfg(tiny_lm, files, ["default_record_kind=qa", "save_name=teacher"]))["files"]
    assert [r["output"] for r in res] == [str(tmp_path / "chat" / "train.scored.teacher.json"),
                                          str(tmp_path / "lrlm" / "train.scored.teacher.json"),
                                          str(tmp_path / "qa" / "train.neg.bge.scored.teacher.json")]
    for r, src in zip(res, [chat, lrlm, qa]):
        got = read_jsonl(r["output"])
        assert len(got) == len(src)
        for a, b in zip(src, got):
            assert {k: v for k, v in b.items() if k != "teacher_scores"} == {k: v for k, v in a.items()
                                                                              if k != "teacher_scores"}
            keys = a["history"] if "history" in a else a["pos"] + a["neg"]
            assert len(b["teacher_scores"]) == len(keys) and all(math.isfinite(x) for x in b["teacher_scores"])
        meta = json.load(open(r["meta"]))
        assert meta["scorer"]["name"] == "tiny" and meta["scorer"]["architecture"] == "LlamaForCausalLM"
        assert meta["normalize"] == "mean" and meta["candidates"] == sum(len(x) for x in [
            s.get("history") or s["pos"] + s["neg"] for s in src])
        assert set(meta) >= {"templates", "date", "git_commit", "scorer", "truncation", "input_sha256", "answer_choice",
                             "seed", "fingerprint"}
        assert "revision" in meta["scorer"]
    assert json.load(open(res[0]["meta"]))["replaced_teacher_scores"] == 1
    assert "Speaker 1: {query}" in json.load(open(res[0]["meta"]))["templates"]["chat"]["text"]


def test_max_candidates_cuts_lists_consistently(tmp_path, tiny_lm):
    from embedder.scoring.run import run_score

    rec = {"query": "q", "answers": ["a"], "pos": ["p"], "neg": ["n0", "n1", "n2", "n3"], "neg_index": [0, 1, 2, 3],
           "pos_index": [9], "task": "qa"}
    chat = {"history": ["t0", "t1", "t2"], "query": "q", "answers": ["a"], "task": "chat"}
    path = write_jsonl(tmp_path / "x.json", [rec, chat])
    (res,) = run_score(score_cfg(tiny_lm, path, ["max_candidates=2"]))["files"]
    a, b = read_jsonl(res["output"])
    assert a["pos"] == ["p"] and a["neg"] == ["n0"] and a["neg_index"] == [0] and len(a["teacher_scores"]) == 2
    assert b["history"] == ["t1", "t2"] and len(b["teacher_scores"]) == 2
    assert json.load(open(res["meta"]))["records_with_candidates_cut"] == 2


def test_long_keys_and_prompts_are_cut_from_the_knowledge_side(tmp_path, tiny_lm):
    from embedder.scoring.run import run_score

    recs = [{"query": "short question?", "answers": ["short answer"], "pos": ["knowledge " * 200], "neg": ["tiny"],
             "task": "qa"},
            {"query": "a very long question " * 40, "answers": ["the answer " * 20], "pos": ["k"], "task": "qa"}]
    path = write_jsonl(tmp_path / "x.json", recs)
    (res,) = run_score(score_cfg(tiny_lm, path, ["key_max_length=64", "lm.max_length=96"]))["files"]
    got = read_jsonl(res["output"])
    assert all(math.isfinite(x) for r in got for x in r["teacher_scores"])
    t = json.load(open(res["meta"]))["truncation"]
    assert t["keys_truncated"] == 1 and t["context_truncated"] >= 2 and t["context_cut_left"] == 1
    assert t["answers_truncated"] == 1


def test_scored_file_loads_as_training_data(tmp_path, tiny_lm):
    """The output passes the training data contract (teacher_scores aligned), e.g. for task=msmarco distillation."""
    from omegaconf import OmegaConf

    from embedder.data.train_files import load_train_file
    from embedder.record_kinds import build_record_kinds
    from embedder.scoring.run import run_score

    src = write_jsonl(tmp_path / "qa" / "train.json", read_jsonl(toy_path("qa"))[:3])
    (res,) = run_score(score_cfg(tiny_lm, src, ["max_candidates=5"]))["files"]
    tcfg = compose(["task=msmarco"])
    tasks = build_record_kinds(OmegaConf.to_container(tcfg.record_kinds, resolve=True), 4)
    loaded = load_train_file(res["output"], tasks)
    assert len(loaded.records) == 3 and all(len(r["teacher_scores"]) == 5 for r in loaded.records)


# -------------------------------------------------------------------------------- bad input, before any model
def _no_model(self, *a, **k):
    raise AssertionError("a model or tokenizer was loaded")


@pytest.mark.parametrize("bad,line,field,match", [
    ({"answers": None}, 2, "answers", "missing 'answers'"),
    ({"answers": []}, 2, "answers", "non-empty list"),
    ({"pos": [], "neg": []}, 2, "pos", "no candidates"),
    ({"query": None}, 2, "query", "missing 'query'"),
    ({"task": "tool"}, 2, "task", "task 'tool' has no LM-scoring template"),
    ({"task": None}, 2, "task", "no 'task'"),
])
def test_bad_records_fail_before_the_model_loads(tmp_path, tiny_lm, monkeypatch, bad, line, field, match):
    from embedder.scoring import lm_scorer
    from embedder.scoring.run import run_score

    monkeypatch.setattr(lm_scorer.LMScorer, "__init__", _no_model)
    good = qa_records(1)[0]
    broken = {k: v for k, v in {**good, **bad}.items() if v is not None}
    path = write_jsonl(tmp_path / "bad.json", [good, broken])
    with pytest.raises(DataError, match=match) as e:
        run_score(score_cfg(tiny_lm, path))
    assert (e.value.path, e.value.line, e.value.field) == (path, line, field)
    assert f"line {line}" in str(e.value) and "bad.json" in str(e.value)


def test_empty_chat_history_and_tool_toy_file(tmp_path, tiny_lm, monkeypatch):
    from embedder.scoring import lm_scorer
    from embedder.scoring.run import run_score

    monkeypatch.setattr(lm_scorer.LMScorer, "__init__", _no_model)
    path = write_jsonl(tmp_path / "c.json", [{"history": [], "query": "q", "answers": ["a"], "task": "chat"}])
    with pytest.raises(DataError, match="'history' is empty") as e:
        run_score(score_cfg(tiny_lm, path))
    assert e.value.field == "history"
    with pytest.raises(DataError, match="task 'tool' has no LM-scoring template") as e:
        run_score(score_cfg(tiny_lm, toy_path("tool")))
    assert e.value.line == 1 and "+templates.tool.text" in str(e.value)
    # the reference's icl training file has no answers (issue #344): caught the same way
    with pytest.raises(DataError, match="missing 'answers'"):
        run_score(score_cfg(tiny_lm, toy_path("icl")))


def test_user_template_for_a_new_task(tmp_path, tiny_lm):
    from embedder.scoring.run import run_score

    path = write_jsonl(tmp_path / "t.json", [{"query": "fetch a url", "answers": ["call get"], "pos": ["Scraper GET"],
                                             "neg": ["DNS lookup"], "task": "tool"}])
    (res,) = run_score(score_cfg(tiny_lm, path, ['+templates.tool.text="Tool: {key}\\nRequest: {query}\\nCall: {answer}"']))[
        "files"]
    assert len(read_jsonl(res["output"])[0]["teacher_scores"]) == 2
    with pytest.raises(ValueError, match="must end with"):
        run_score(score_cfg(tiny_lm, path, ['+templates.tool.text="{answer} {key}"']))


def test_dry_run_loads_no_model(tmp_path, tiny_lm, monkeypatch, capsys):
    from embedder.scoring import lm_scorer
    from embedder.scoring.run import run_score

    monkeypatch.setattr(lm_scorer.LMScorer, "_load_model", _no_model)
    path = write_jsonl(tmp_path / "x.json", qa_records(4))
    (res,) = run_score(score_cfg(tiny_lm, path, ["dry_run=true"]))["files"]
    assert res["status"] == "dry_run" and res["pairs"] == 1 + 2 + 3 + 4 + 4 and res["estimated_tokens"] > 0
    assert "LM inputs" in capsys.readouterr().out and not os.path.exists(res["output"])


# ---------------------------------------------------------------------------------------------------- configs
def test_score_configs_compose():
    from embedder.scoring.run import settings_from_cfg
    from embedder.scoring.templates import build_templates

    lms = sorted(p.stem for p in (ROOT / "configs" / "lm").glob("*.yaml"))
    assert {"smollm2", "llama2-7b-chat", "tiny"} <= set(lms)
    for lm in lms:
        cfg = compose([f"lm={lm}"], config_name="score")
        assert cfg.save_name == lm == cfg.lm.name
    cfg = compose(["lm=llama2-7b-chat"], config_name="score")
    assert cfg.lm.model_name_or_path == "meta-llama/Llama-2-7b-chat-hf" and cfg.key_max_length == 512
    t = build_templates(dict(cfg.templates))
    assert set(t) == {"qa", "convsearch", "icl", "chat", "lrlm", "beir"}  # beir: query likelihood for task=beir
    assert t["qa"].text == QA and t["lrlm"].fields == ["context", "query"]
    sample = compose([], config_name="score")
    if all(os.path.exists(os.path.join(ROOT, "embedder", "sample_data", f.split(":")[1]))
           for f in sample.sample.files):
        s = settings_from_cfg(sample)
        assert len(s.files) == 4 and s.max_records == 8 and s.output_dir == "outputs/score/sample"
        assert s.lm["gguf_file"].endswith(".gguf")


def test_reference_command_resolves_paths(tmp_path):
    from embedder.scoring.run import output_paths, settings_from_cfg

    src = write_jsonl(tmp_path / "qa" / "msmarco" / "train.json", qa_records(1))
    cfg = compose(["input_data=llm-embedder:qa/msmarco/train.json", f"data_root={tmp_path}", "lm=llama2-7b-chat"],
                  config_name="score")
    s = settings_from_cfg(cfg)
    assert s.files == [src] and s.max_records is None and s.output_dir is None
    assert output_paths(src, s)[0] == str(tmp_path / "qa" / "msmarco" / "train.scored.llama2-7b-chat.json")
    s.output_dir = str(tmp_path / "out")
    assert output_paths(src, s)[0] == str(tmp_path / "out" / "qa" / "msmarco" / "train.scored.llama2-7b-chat.json")


# ---------------------------------------------------------------------------------------------- the real LM
@pytest.mark.slow
def test_smollm2_on_toy_qa(tmp_path):
    """Sanity check with the bundled SmolLM2: finite scores <= 0, aligned; prints how often the positive wins."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from embedder.scoring.run import run_score

    src = write_jsonl(tmp_path / "qa" / "train.json", read_jsonl(toy_path("qa")))
    cfg = compose([f"input_data=[{src}]", "max_candidates=4", "batch_size=8"], config_name="score")
    (res,) = run_score(cfg)["files"]
    got = read_jsonl(res["output"])
    assert len(got) == 8
    wins_each, wins_mean = [], []
    for r in got:
        ts = r["teacher_scores"]
        assert len(ts) == len(r["pos"]) + len(r["neg"]) == 4
        assert all(math.isfinite(x) and x <= 0 for x in ts)
        wins_each += [ts[0] > x for x in ts[1:]]
        wins_mean.append(ts[0] > np.mean(ts[1:]))
    print(f"\nSmolLM2 on toy qa: positive above a random negative in {np.mean(wins_each):.0%} of {len(wins_each)} "
          f"pairs; above the mean of its record's negatives in {np.mean(wins_mean):.0%} of {len(wins_mean)} records")
    meta = json.load(open(res["meta"]))
    assert meta["scorer"]["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and meta["candidates"] == 32


def test_every_scoring_yaml_key_has_a_comment():
    import re

    files = [ROOT / "configs" / "score.yaml", *(ROOT / "configs" / "lm").glob("*.yaml"),
             *(ROOT / "configs" / "templates").glob("*.yaml")]
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"^\s*[A-Za-z_][\w.-]*:", line) and "#" not in line:
                raise AssertionError(f"{path.name}:{n} has no comment: {line!r}")


def test_tiny_random_builds_once_into_its_cache(tmp_path):
    from embedder.scoring.lm_scorer import LMScorer

    a = LMScorer("tiny-random", tiny_dir=str(tmp_path / "c"), load_model=False)
    b = LMScorer("tiny-random", tiny_dir=str(tmp_path / "c"), load_model=False)
    assert a.model_name_or_path == b.model_name_or_path == str(tmp_path / "c")
    assert os.path.isfile(tmp_path / "c" / "config.json") and a.tokenizer.bos_token == "<s>"


def test_a_huge_query_is_cut_by_characters_before_tokenising(tiny_scorer, monkeypatch):
    """A 5 MB query: no text longer than max_length x CHARS_PER_TOKEN characters reaches the tokenizer, so memory
    follows the context, not the record; the prompt still ends in the whole answer and fits the context."""
    from embedder.scoring.lm_scorer import CHARS_PER_TOKEN, Job
    from embedder.scoring.templates import Template

    s = tiny_scorer
    limit = s.max_length
    seen = []
    real = type(s.tokenizer).__call__

    def spy(self, text, *a, **k):
        seen.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return real(self, text, *a, **k)

    monkeypatch.setattr(type(s.tokenizer), "__call__", spy)
    t = Template("qa", QA, strip=True)
    rec = {"query": "what is it " * 500_000, "answers": ["the lazy dog"], "pos": ["The fox jumps."], "neg": []}
    (enc,) = s.encode([Job(t, rec, "The fox jumps.", "the lazy dog")])
    assert max(seen) <= limit * CHARS_PER_TOKEN
    assert len(enc.input_ids) <= limit and enc.n_answer >= 3
    assert s.tokenizer.decode(enc.input_ids[-enc.n_answer:]).strip() == "the lazy dog"
    assert np.isfinite(s.score_encoded([enc])).all()


def test_skip_bad_records_leaves_them_out_counts_them_and_resumes(tmp_path, tiny_lm):
    """skip_bad_records=true: a malformed line, a non-UTF-8 line and a record without answers are left out of the
    output and counted in the summary and the sidecar; the good records are scored as without them."""
    from embedder.scoring.run import run_score

    recs = qa_records(4)
    lines = [json.dumps(r) for r in recs]
    raw = "\n".join([lines[0], '{"query": "cut', lines[1], json.dumps({"query": "no answers", "pos": ["x"]}),
                     lines[2], lines[3]]).encode() + b"\n" + b'{"query": "\xff\xfe"}\n'
    bad = tmp_path / "bad" / "qa.json"
    bad.parent.mkdir()
    bad.write_bytes(raw)
    with pytest.raises(DataError, match="line 2"):
        run_score(score_cfg(tiny_lm, str(bad)))
    (res,) = run_score(score_cfg(tiny_lm, str(bad), ["skip_bad_records=true", "part_size=2",
                                                     "answer_choice=first"]))["files"]
    assert res["status"] == "scored" and res["skipped"] == 3 and res["records"] == 4
    got = read_jsonl(res["output"])
    assert [r["query"] for r in got] == [r["query"] for r in recs]
    meta = json.load(open(res["meta"]))
    assert meta["skipped_bad_records"] == 3 and set(meta["skipped_examples"]) == {"2", "4", "7"}
    clean = write_jsonl(tmp_path / "clean" / "qa.json", recs)
    (ref,) = run_score(score_cfg(tiny_lm, clean, ["answer_choice=first"]))["files"]
    for a, b in zip(read_jsonl(ref["output"]), got):  # other batches (part_size): equal up to float rounding
        assert a["teacher_scores"] == pytest.approx(b["teacher_scores"], abs=1e-5)


def test_scoring_defaults_live_in_one_place():
    """score.yaml states ScoreSettings' defaults, and LMScorer's own defaults are the same values."""
    import dataclasses
    import inspect

    from omegaconf import OmegaConf

    from embedder.scoring.lm_scorer import LMScorer
    from embedder.scoring.settings import ScoreSettings

    yaml_cfg = OmegaConf.load(os.path.join(ROOT, "configs", "score.yaml"))
    defaults = {f.name: f.default for f in dataclasses.fields(ScoreSettings) if f.default is not dataclasses.MISSING}
    for key, value in defaults.items():
        if key in yaml_cfg and key not in ("output_dir", "data_root"):
            assert yaml_cfg[key] == value, key
    params = inspect.signature(LMScorer.__init__).parameters
    for key in ("batch_size", "max_tokens_per_batch", "key_max_length", "normalize", "packed"):
        assert params[key].default == defaults[key], key
