"""Short real fits (tokenizer, forward, backward, optimizer step) on each reference toy file, export, resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from embedder.errors import DataError
from embedder.training import run_train
from tests.conftest import compose, quick_overrides, toy_path

# toy file -> the task config whose settings it trains with
TOY_TASKS = {"qa": "msmarco", "convsearch": "qrecc", "chat": "msc", "lrlm": "lrlm", "icl": "icl", "tool": "tool"}


@pytest.mark.parametrize("toy", list(TOY_TASKS))
def test_fit_on_each_toy_file(toy, tmp_path, tiny_bert):
    cfg = compose(quick_overrides(tmp_path, tiny_bert, [f"task={TOY_TASKS[toy]}", f"train_data=[{toy_path(toy)}]",
                                                        "eval=null", "export=false"]))
    run_train(cfg)
    rows = _metrics_rows(tmp_path)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(np.isfinite(losses))
    assert os.path.isfile(tmp_path / "out" / "checkpoints" / "last.ckpt")


def _metrics_rows(tmp_path):
    import csv
    import glob

    (path,) = glob.glob(str(tmp_path / "out" / "csv" / "version_*" / "metrics.csv"))
    with open(path) as f:
        return list(csv.DictReader(f))


def test_multitask_fit_every_batch_one_task(tmp_path, tiny_bert):
    files = ",".join(toy_path(t) for t in TOY_TASKS)
    cfg = compose(quick_overrides(tmp_path, tiny_bert, ["task=llm-embedder", f"train_data=[{files}]", "eval=null",
                                                        "export=false", "trainer.max_steps=6",
                                                        "model.gradient_checkpointing=true"]))
    run_train(cfg)
    tasks_logged = {k.split("/")[1] for r in _metrics_rows(tmp_path) for k, v in r.items()
                    if k.startswith("train/") and k.endswith("/loss") and v}
    assert tasks_logged  # per-task losses were logged


def test_export_is_a_sentence_transformers_model(tmp_path, tiny_bert):
    from sentence_transformers import SentenceTransformer

    from embedder.modeling import DualEncoder

    cfg = compose(quick_overrides(tmp_path, tiny_bert, ["task=tool", f"train_data=[{toy_path('tool')}]", "eval=null"]))
    run_train(cfg)
    out = str(tmp_path / "out")
    st = SentenceTransformer(out, device="cpu")
    assert st.prompts["tool_query"] == "Transform this user request for fetching helpful tool descriptions: "
    assert st.prompts["query"] == st.prompts["tool_query"]
    enc = DualEncoder(out, pooling="cls", attn_implementation=None)  # reload the trained weights
    texts = ["find a weather api", "translate text between languages"]
    # the export's length (the training's 128): the instruction plus the text fit, so the texts embed apart
    assert st.max_seq_length == 128 > len(st.prompts["query"]) + max(map(len, texts)) + 2
    ours = enc.encode_texts([st.prompts["query"] + t for t in texts], "query", max_length=st.max_seq_length)
    theirs = st.encode(texts, prompt_name="query", convert_to_tensor=True, normalize_embeddings=False)
    assert torch.allclose(ours, theirs.cpu(), atol=1e-5)
    assert float(ours[0] @ ours[1]) < 0.99 * float(ours[0].norm() * ours[1].norm())
    meta = json.load(open(os.path.join(out, "embedder_config.json")))
    assert meta["pooling"] == "cls" and meta["normalize"]


def test_untied_encoders_export_both(tmp_path, tiny_bert):
    from sentence_transformers import SentenceTransformer

    cfg = compose(quick_overrides(tmp_path, tiny_bert, ["task=tool", f"train_data=[{toy_path('tool')}]", "eval=null",
                                                        "model.tie_encoders=false", "model.pooling=mean",
                                                        "model.dense=true"]))
    run_train(cfg)
    out = str(tmp_path / "out")
    st = SentenceTransformer(out, device="cpu")  # one model: a Router sends queries and documents to their encoder
    q, d = st.encode_query(["hello"]), st.encode_document(["hello"])
    assert q.shape == d.shape == (1, 32) and not np.allclose(q, d)  # two encoders, each with the dense layer
    from embedder.retrieval.encode.model import load_encoder

    enc = load_encoder({"_target_": "embedder.modeling.DualEncoder", "model_name_or_path": out,
                        "attn_implementation": None}, model_path=out)
    assert not enc.tie_encoders and enc.dense is not None
    text = [st.prompts.get("query", "") + "hello"]
    ours = enc.encode_texts(text, "query", max_length=st.max_seq_length).numpy()
    np.testing.assert_allclose(ours, st.encode_query(["hello"]), atol=1e-5)


class CrashAtStep:
    """Simulates a crash: raises at the start of the given global step (after the previous checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self):
        from lightning import Callback

        step = self.step

        class _Crash(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    raise RuntimeError("simulated crash")

        return _Crash()


def _run_tool(tmp_path, tiny_bert, overrides, crash_at=None):
    cfg = compose(quick_overrides(tmp_path, tiny_bert, ["task=tool", f"train_data=[{toy_path('tool')}]", "eval=null",
                                                        "export=false", "save_steps=1", "query_max_length=128",
                                                        "trainer.max_steps=6", *overrides]))
    with open_dict(cfg):
        cfg.callbacks.best_checkpoint = None
    if crash_at is not None:
        import embedder.training as training

        orig = training._instantiate_dict
        training._instantiate_dict = lambda c: orig(c) + ([CrashAtStep(crash_at)()] if c is cfg.callbacks else [])
        try:
            with pytest.raises(RuntimeError, match="simulated crash"):
                run_train(cfg)
        finally:
            training._instantiate_dict = orig
    else:
        run_train(cfg)
    return torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_resume_matches_uninterrupted_run(tmp_path, tiny_bert):
    """Crash at step 3 of 6 (mid-epoch: 4 batches per epoch), resume with ckpt_path=last, compare with a straight run:
    same weights, optimizer moments, LR schedule, data position and dropout RNG."""
    full = _run_tool(tmp_path / "a", tiny_bert, [])
    _run_tool(tmp_path / "b", tiny_bert, [], crash_at=3)
    resumed = _run_tool(tmp_path / "b", tiny_bert, ["ckpt_path=last"])
    assert resumed["global_step"] == full["global_step"] == 6
    for k, v in full["state_dict"].items():
        assert torch.allclose(v, resumed["state_dict"][k], atol=1e-6), k
    for a, b in zip(full["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert torch.allclose(a["exp_avg"], b["exp_avg"], atol=1e-7)
    assert resumed["lr_schedulers"][0]["last_epoch"] == full["lr_schedulers"][0]["last_epoch"]


@pytest.mark.slow
def test_ddp_sim_two_cpu_processes(tmp_path, tiny_bert):
    """trainer=ddp_sim: 2 gloo processes, cross-device negatives, each rank its own slice of every global batch."""
    cfg = compose(quick_overrides(tmp_path, tiny_bert, ["task=msmarco", f"train_data=[{toy_path('qa')}]", "eval=null",
                                                        "trainer=ddp_sim", "data.batch_size=2", "export=false"]))
    run_train(cfg)
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2


def test_lora_under_ddp_sim(tmp_path, tiny_bert):
    """LoRA with DDP (2 gloo processes): the frozen backbone needs no gradient sync; the adapters train, the
    checkpoint holds them alone, the export is merged."""
    run_train(compose(quick_overrides(tmp_path, tiny_bert, [
        "task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "trainer=ddp_sim", "data.batch_size=2",
        "report=false", LORA, "optimizer.lr=1e-2"])))
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sample_data_with_real_minilm_improves(tmp_path):
    """The demo, shortened: the bundled MiniLM on the bundled sample data gets better on held-out queries."""
    cfg = compose(["trainer=cpu", "trainer.max_steps=15", f"output_dir={tmp_path}/out", "eval.convsearch=null",
                   "eval.tool=null", "callbacks.rich_progress_bar=null"])
    after = run_train(cfg)
    before = json.load(open(tmp_path / "out" / "metrics.json"))["before"]
    assert after["val/qa/ndcg@10"] > before["val/qa/ndcg@10"]
    assert after["val/qa/mrr@10"] > before["val/qa/mrr@10"]


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["wandb", "many"])
def test_fit_with_other_loggers_offline(logger, tmp_path, tiny_bert, monkeypatch):
    """W&B writes an offline run (no network, no login); `many` writes CSV and TensorBoard together."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose(quick_overrides(tmp_path, tiny_bert, ["task=tool", f"train_data=[{toy_path('tool')}]", "eval=null",
                                                        "export=false", f"logger={logger}"]))
    run_train(cfg)
    if logger == "wandb":
        assert list((tmp_path / "out").rglob("*.wandb")) or list(tmp_path.rglob("offline-run-*"))
    else:
        assert list((tmp_path / "out" / "tensorboard").rglob("events.out.tfevents.*"))
        assert list((tmp_path / "out" / "csv").rglob("metrics.csv"))


def test_validation_during_training_and_best_checkpoint(tmp_path, tiny_bert):
    """val/<set>/<metric>@k is logged every val_check_interval steps and best.ckpt follows the task metric."""
    cfg = compose(quick_overrides(tmp_path, tiny_bert, [
        "task=sample", "train_data=[llm-embedder:tool/train.json]", "eval.qa=null", "eval.convsearch=null",
        "recipe_metric=val/tool/ndcg@5", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "evaluate_before=false", "export=false"]))
    after = run_train(cfg)
    assert set(after) >= {"val/tool/ndcg@5", "val/tool/mrr@1", "val/tool/recall@3"}
    logged_steps = {int(r["step"]) for r in _metrics_rows(tmp_path) if r.get("val/tool/ndcg@5")}
    assert {1, 3} <= logged_steps  # Lightning logs validation at the last completed step index (0-based)
    assert (tmp_path / "out" / "checkpoints" / "best.ckpt").exists()


@pytest.mark.slow
def test_ddp_evaluation_equals_single_process(tmp_path, tiny_bert):
    """Sharded, all-gathered evaluation on 2 gloo ranks gives the single-process metrics (same untrained weights)."""
    def before(sub, extra):
        cfg = compose(quick_overrides(tmp_path / sub, tiny_bert, [
            "task=sample", "train_data=[llm-embedder:tool/train.json]", "eval.qa=null", "eval.convsearch=null",
            "recipe_metric=val/tool/ndcg@5", "export=false", "data.batch_size=2", *extra]))
        after = run_train(cfg)
        assert after  # metrics come back from the spawned workers too
        return json.load(open(tmp_path / sub / "out" / "metrics.json"))["before"]

    # 2 ranks, the 196-row corpus cut into 8 store shards: each rank encodes, indexes and searches 4 of them
    single, ddp = before("single", []), before("ddp", ["trainer=ddp_sim", "+eval.tool.shard_size=25"])
    assert single.keys() == ddp.keys() and single
    for k in single:
        assert ddp[k] == pytest.approx(single[k], abs=1e-6), k


def test_untrained_eval_embeddings_are_cached_and_step_stores_removed(tmp_path, tiny_bert, caplog):
    """evaluate_before encodes the corpus once per model: a second run reuses the stores; the stores of trained
    weights are deleted at the end of the run."""
    import logging

    from embedder.data.index_cache import cache_root

    caplog.set_level(logging.INFO, logger="embedder")
    overrides = ["task=sample", "train_data=[llm-embedder:tool/train.json]", "eval.qa=null", "eval.convsearch=null",
                 "recipe_metric=val/tool/ndcg@5", "export=false", "+eval.tool.shard_size=50"]
    first = run_train(compose(quick_overrides(tmp_path / "a", tiny_bert, overrides)))
    shards = sorted((os.path.join(d, f), os.path.getmtime(os.path.join(d, f)))
                    for d, _, files in os.walk(os.path.join(cache_root(), "eval-encode")) for f in files
                    if f.startswith("shard-"))
    assert len(shards) >= 5  # 4 corpus shards + the queries
    caplog.clear()
    second = run_train(compose(quick_overrides(tmp_path / "b", tiny_bert, overrides)))
    assert "eval tool: encoding 0 shard(s) on 1 rank(s) (5 reused" in caplog.text  # before: nothing encoded
    assert "eval tool: encoding 5 shard(s)" in caplog.text  # after training: new weights, encoded again
    assert shards == sorted((p, os.path.getmtime(p)) for p, _ in shards)  # the cached shards were not rewritten
    assert first == second  # same seed, same data: the same run
    for run in ("a", "b"):
        assert not os.path.exists(tmp_path / run / "out" / "eval-encode")  # trained stores are gone at the end


@pytest.mark.slow
def test_ddp_metrics_after_training_equal_standalone_evaluation_of_the_export(tmp_path):
    """2 gloo ranks, each encoding, indexing and searching its shards of the corpus during training, report the
    metrics that `python -m embedder.evaluate` computes for the exported model in one process (bundled MiniLM,
    so that training moves the metrics and a reuse of the untrained weights' cached stores would show)."""
    from embedder.evaluation.run import run_evaluate

    sets = ["eval.qa=null", "eval.convsearch=null"]
    cfg = compose([
        "task=sample", "train_data=[llm-embedder:tool/train.json]", *sets, "recipe_metric=val/tool/ndcg@5",
        "trainer=ddp_sim", "+eval.tool.shard_size=25", "trainer.max_steps=4", "trainer.max_epochs=-1",
        "optimizer.lr=1e-4", "logger=csv", f"output_dir={tmp_path}/out", "data.batch_size=4", "data.group_size=4",
        "query_max_length=64", "key_max_length=64", "callbacks.rich_progress_bar=null"])
    after = run_train(cfg)
    before = json.load(open(tmp_path / "out" / "metrics.json"))["before"]
    assert before.keys() == after.keys() and before != after  # training moved the metrics
    standalone = run_evaluate(compose([
        "task=sample", *sets, f"model_path={tmp_path}/out", "trainer=cpu", "+trainer.enable_progress_bar=false",
        "query_max_length=64", "key_max_length=64", f"output_dir={tmp_path}/eval"], "eval"))
    assert {f"val/{k}" for k in standalone} == set(after)
    for k, v in standalone.items():
        assert after[f"val/{k}"] == pytest.approx(v, abs=1e-6), k


def test_nonfinite_loss_stops_the_run_and_keeps_the_earlier_export(tmp_path, tiny_bert):
    """A good export exists; a run whose loss blows up (lr 1e30) stops with step, task and file, exports nothing,
    and leaves every file of the earlier export as it was."""
    from embedder.lit_module import NonFiniteLossError

    tool = toy_path("tool")
    good = ["task=tool", f"train_data=[{tool}]", "eval=null", "trainer.max_steps=1"]
    run_train(compose(quick_overrides(tmp_path, tiny_bert, good)))
    out = tmp_path / "out"
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts
                and p.name not in ("metrics.json", "config.yaml") and "csv" not in p.parts}
    assert (out / "model.safetensors").exists() and (out / ".export-manifest.json").exists()
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf).* at step \d+ \(record kind 'tool'") as e:
        run_train(compose(quick_overrides(tmp_path, tiny_bert, good + ["optimizer.lr=1e30", "trainer.max_steps=6",
                                                                       "ckpt_path=null"])))
    assert tool in str(e.value)
    assert {p: p.read_bytes() for p in snapshot} == snapshot
    assert not list(out.glob(".export-tmp-*"))


def test_export_swaps_in_whole_and_drops_what_the_new_export_lacks(tmp_path):
    from embedder.atomic import publish_folder, staging_folder

    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_text("ckpt")
    tmp = staging_folder(str(out))
    os.makedirs(os.path.join(tmp, "query_encoder"))
    open(os.path.join(tmp, "query_encoder", "w.bin"), "w").write("old")
    open(os.path.join(tmp, "config.json"), "w").write("old")
    publish_folder(tmp, str(out))
    tmp = staging_folder(str(out))
    open(os.path.join(tmp, "config.json"), "w").write("new")
    open(os.path.join(tmp, "model.safetensors"), "w").write("new")
    publish_folder(tmp, str(out))
    assert sorted(p.name for p in out.iterdir()) == [".export-manifest.json", "checkpoints", "config.json",
                                                      "model.safetensors"]
    assert (out / "config.json").read_text() == "new" and (out / "checkpoints" / "last.ckpt").read_text() == "ckpt"
    (out / ".export-tmp-99999").mkdir()  # a killed run's temp folder is removed by the next export
    staging_folder(str(out))
    assert not (out / ".export-tmp-99999").exists()


def test_ckpt_path_last_needs_a_checkpoint_and_corrupt_ones_are_named(tmp_path, tiny_bert):
    from embedder.checkpoints import resolve_ckpt_path
    from embedder.errors import DataError

    base = ["task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "export=false"]
    with pytest.raises(DataError, match=r"(?s)checkpoints: ckpt_path=last: no last\*\.ckpt in this folder.*last_or_none"):
        run_train(compose(quick_overrides(tmp_path, tiny_bert, base + ["ckpt_path=last"])))
    run_train(compose(quick_overrides(tmp_path, tiny_bert, base + ["ckpt_path=last_or_none"])))  # starts fresh
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path("last", str(tmp_path / "out")) == str(last)
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"last\.ckpt, field 'ckpt_path': the checkpoint is corrupt or truncated"):
        resolve_ckpt_path("last", str(tmp_path / "out"))
    with pytest.raises(DataError, match="checkpoint not found"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), str(tmp_path / "out"))


def test_records_without_task_take_the_only_kind_of_a_single_kind_config(tmp_path, tiny_bert):
    """task=tool defines one record kind, so records without "task" are tool records; a multi-kind config needs
    default_record_kind, and says so."""
    from embedder.errors import DataError

    recs = [json.loads(x) for x in open(toy_path("tool")) if x.strip()]
    for r in recs:
        r.pop("task", None)
    path = tmp_path / "tool-no-task.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    base = [f"train_data=[{path}]", "eval=null", "export=false", "trainer.max_steps=1"]
    run_train(compose(quick_overrides(tmp_path, tiny_bert, ["task=tool", *base])))
    with pytest.raises(DataError, match=r"line 1, field 'task': record has no 'task'"):
        run_train(compose(quick_overrides(tmp_path / "b", tiny_bert, ["task=llm-embedder", *base])))
    run_train(compose(quick_overrides(tmp_path / "c", tiny_bert, ["task=llm-embedder", "default_record_kind=tool", *base])))


def test_loggers_get_the_config_and_the_export_gets_a_model_card(tmp_path, tiny_bert):
    """CSV hparams.yaml holds the resolved config, the training files with record counts, the commit and the
    versions; a multi-task export gets qa's instructions as its query/document prompts and a real model card."""
    import yaml
    from sentence_transformers import SentenceTransformer

    qa, tool = toy_path("qa"), toy_path("tool")
    cfg = compose(quick_overrides(tmp_path, tiny_bert, ["task=llm-embedder", f"train_data=[{qa},{tool}]", "eval=null",
                                                        "trainer.max_steps=1", "data.inbatch_same_dataset=epoch"]))
    run_train(cfg)
    out = tmp_path / "out"
    (hp,) = list(out.rglob("hparams.yaml"))
    logged = yaml.safe_load(hp.read_text())
    assert logged["model"]["model_name_or_path"] == tiny_bert and logged["optimizer"]["lr"] == 5e-6
    assert set(logged["run"]["train_records"]) == {qa, tool} and all(logged["run"]["train_records"].values())
    assert "torch" in logged["run"]["versions"] and "git_commit" in logged["run"]
    st = SentenceTransformer(str(out), device="cpu")
    assert st.prompts["query"] == st.prompts["qa_query"] and st.prompts["document"] == st.prompts["qa_key"]
    assert st.prompts["tool_query"] != st.prompts["query"]
    card = (out / "README.md").read_text()
    for part in ("base_model: " + tiny_bert, "encode_query", "## Training data", qa, "## Hyperparameters",
                 "| learning rate | 5e-06 |", "qa_query"):
        assert part in card, part


def test_hub_push_uploads_the_export_only(tmp_path, tiny_bert, monkeypatch):
    """hub.repo_id=... pushes after training, through huggingface_hub (mocked: no network); only the export's files
    go up, not checkpoints or logs."""
    import fnmatch

    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw)

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, **kw):
        files = [os.path.relpath(os.path.join(r, f), folder_path) for r, _, fs in os.walk(folder_path) for f in fs]
        calls["uploaded"] = sorted(f for f in files if any(fnmatch.fnmatch(f, p) for p in allow_patterns))
        return "https://huggingface.co/me/model/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    run_train(compose(quick_overrides(tmp_path, tiny_bert, ["task=tool", f"train_data=[{toy_path('tool')}]",
                                                            "eval=null", "trainer.max_steps=1", "hub.repo_id=me/model"])))
    assert calls["create"][0] == "me/model" and calls["create"][1]["private"] is True
    up = calls["uploaded"]
    assert "model.safetensors" in up and "README.md" in up and "modules.json" in up
    assert not [f for f in up if f.startswith(("checkpoints", "csv")) or f in ("metrics.json", "config.yaml")]


def test_report_with_plots_from_the_csv_logs(tmp_path, tiny_bert, monkeypatch):
    """report.md with loss, lr, throughput and evaluation plots; without matplotlib one log line, no report."""
    pytest.importorskip("matplotlib")
    run_train(compose(quick_overrides(tmp_path, tiny_bert, [
        "task=sample", "train_data=[llm-embedder:tool/train.json]", "eval.qa=null", "eval.convsearch=null",
        "recipe_metric=val/tool/ndcg@5", "trainer.max_steps=3", "export=false"])))
    report = (tmp_path / "out" / "report.md").read_text()
    for stem in ("loss", "lr", "throughput", "eval"):
        png = tmp_path / "out" / "report" / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"report/{stem}.png" in report
    assert "## Before -> after" in report

    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("matplotlib") else real_import(name, *a, **k))
    from embedder.report import write_report

    (tmp_path / "out" / "report.md").unlink()
    assert write_report(str(tmp_path / "out")) is None and not (tmp_path / "out" / "report.md").exists()



def test_lr_schedule_is_hf_trainers_linear_warmup(tmp_path, tiny_bert):
    """The LR logged at every step equals transformers.get_linear_schedule_with_warmup with the HF Trainer's
    warmup steps (ceil(warmup_ratio x total)): 0 at step 0, the peak after warmup, then linearly down to 0."""
    import math

    from transformers import get_linear_schedule_with_warmup

    run_train(compose(quick_overrides(tmp_path, tiny_bert, ["task=tool", f"train_data=[{toy_path('tool')}]",
                                                            "eval=null", "export=false", "trainer.max_steps=10",
                                                            "warmup_ratio=0.15", "optimizer.lr=1e-3"])))
    logged = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in _metrics_rows(tmp_path) if r.get("lr-AdamW/pg1")}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(0.15 * 10), 10)
    want = {}
    for step in range(10):
        want[step] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    assert logged == pytest.approx(want) and logged[0] == 0.0 and max(logged.values()) == pytest.approx(1e-3)


def test_host_malloc_settings_reach_glibc():
    """train.yaml's host_malloc is applied with glibc's mallopt (where the C library is glibc)."""
    import platform

    from embedder.host_memory import tune_malloc

    cfg = compose([])
    assert cfg.host_malloc.mmap_threshold is None and cfg.host_malloc.arena_max == 2
    assert cfg.callbacks.malloc_trim.every_n_steps == 0  # off: on SciFact it cost +23% CPU (docs/benchmarks.md)
    assert tune_malloc(None, None) is False  # nothing asked: nothing changed
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tune_malloc(65536, cfg.host_malloc.arena_max) is True
    import pickle

    from embedder.host_memory import MallocTrim, _glibc

    assert _glibc() is not None and pickle.loads(pickle.dumps(MallocTrim(4))).every_n_steps == 4  # DDP spawn pickles it


LORA = "model.lora={r:4,alpha:8,dropout:0.0,target_modules:[query,value]}"


def test_optimizer_groups_are_never_empty_and_follow_zero3_shapes(tiny_bert):
    """DeepSpeed deletes empty parameter groups from the optimizer it wraps, and a scheduler built on both groups
    then failed its first step on an H200 (`zip() argument 2 is longer than argument 1`: LoRA trains no 1-D weight;
    under ZeRO-3 a partitioned weight is an empty 1-D tensor). Groups are never empty, the scheduler has one
    learning rate per group, and a partitioned 2-D weight (DeepSpeed's `ds_shape`) still decays."""
    from unittest import mock

    from embedder.lit_module import RetrieverModule
    from embedder.modeling.encoder import DualEncoder
    from embedder.record_kinds import build_record_kinds

    tasks = build_record_kinds({"qa": {"losses": [{"_target_": "embedder.losses.InfoNCELoss", "weight": 1.0}]}}, 2)

    def configure(module):
        module._trainer = mock.Mock(estimated_stepping_batches=10)
        conf = module.configure_optimizers()
        opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
        assert all(g["params"] for g in opt.param_groups) and len(sched.base_lrs) == len(opt.param_groups)
        opt.step()
        sched.step()  # what failed under DeepSpeed
        return opt.param_groups

    lora = RetrieverModule(DualEncoder(tiny_bert, lora={"r": 4, "alpha": 8, "target_modules": ["query", "value"]}),
                           tasks, weight_decay=0.01)
    (only,) = configure(lora)  # adapters are 2-D: one decayed group, no empty no-decay group
    assert only["weight_decay"] == 0.01 and len(only["params"]) == 4 * 2  # 2 layers x (query, value) x (A, B)

    full = RetrieverModule(DualEncoder(tiny_bert), tasks, weight_decay=0.01)
    expected = [len(g["params"]) for g in configure(full)]
    with torch.no_grad():  # as ZeRO-3 leaves them: the data an empty 1-D tensor, the shape in ds_shape
        for p in full.parameters():
            p.ds_shape = p.shape
            p.data = torch.empty(0)
    assert [len(g["params"]) for g in configure(full)] == expected


def test_lora_trains_adapters_only_checkpoints_them_and_exports_them_merged(tmp_path, tiny_bert):
    """model.lora (peft): only the adapters train; the checkpoint holds them alone; a resumed run continues from
    them; the export is a plain model with the adapters merged, equal to the trained encoder."""
    from safetensors.torch import load_file

    from embedder.modeling.encoder import DualEncoder

    base = ["task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "report=false", LORA]
    run_train(compose(quick_overrides(tmp_path, tiny_bert, base)))
    out = tmp_path / "out"
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)  # adapters only, no frozen backbone
    assert any("query" in k for k in keys) and any("value" in k for k in keys) and not any("key." in k for k in keys)
    assert any(float(v.abs().sum()) > 0 for k, v in ckpt["state_dict"].items() if "lora_B" in k)  # B moved off 0

    fresh = DualEncoder(tiny_bert, lora={"r": 4, "alpha": 8, "target_modules": ["query", "value"]})
    trainable = sum(p.numel() for p in fresh.parameters() if p.requires_grad)
    assert 0 < trainable < 0.1 * sum(p.numel() for p in fresh.parameters())
    fresh.load_state_dict({k.removeprefix("encoder."): v for k, v in ckpt["state_dict"].items()}, strict=False)
    fresh.eval()
    texts = ["weather in paris", "convert 10 usd to eur"]
    trained = fresh.encode_texts(texts, kind="query")
    exported = DualEncoder(str(out)).eval().encode_texts(texts, kind="query")
    assert torch.allclose(trained, exported, atol=1e-5)  # merged export == base + adapters
    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in weights)  # a plain model: no peft needed to use it
    base_weights = load_file(f"{tiny_bert}/model.safetensors")
    q = next(k for k in weights if k.endswith("attention.self.query.weight"))
    kk = next(k for k in weights if k.endswith("attention.self.key.weight"))
    assert not torch.equal(weights[q], base_weights[q]) and torch.equal(weights[kk], base_weights[kk])

    run_train(compose(quick_overrides(tmp_path, tiny_bert, base + ["ckpt_path=last", "trainer.max_steps=3"])))
    resumed = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 3 and list(resumed["state_dict"]) == keys


def test_lora_adapter_export_loads_under_its_base_model(tmp_path, tiny_bert):
    """export_lora=adapter: the export holds the adapters only (no full weights) and names the base model;
    sentence-transformers and our own loader both load it under the base, and encode like the merged export of the
    same checkpoint."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from embedder.modeling.encoder import DualEncoder

    base = ["task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "report=false", LORA, "optimizer.lr=1e-2"]
    run_train(compose(quick_overrides(tmp_path / "a", tiny_bert, base + ["export_lora=adapter"])))
    run_train(compose(quick_overrides(tmp_path / "m", tiny_bert, base)))  # the same run, merged
    adapter, merged = tmp_path / "a" / "out", tmp_path / "m" / "out"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_bert
    texts = ["weather in paris", "convert 10 usd to eur", "book a table"]
    from embedder.retrieval.encode.model import load_encoder

    want = load_encoder({"_target_": "embedder.modeling.encoder.DualEncoder", "model_name_or_path": str(merged)},
                        str(merged)).eval().encode_texts(texts, kind="key").numpy()
    ours = load_encoder({"_target_": "embedder.modeling.encoder.DualEncoder", "model_name_or_path": str(adapter)},
                        str(adapter)).eval().encode_texts(texts, kind="key").numpy()
    theirs = SentenceTransformer(str(adapter), device="cpu").encode(texts)
    assert np.allclose(ours, want, atol=1e-5) and np.allclose(theirs, want, atol=1e-5)
    untrained = DualEncoder(tiny_bert, pooling="cls").eval().encode_texts(texts, kind="key").numpy()
    assert not np.allclose(want, untrained, atol=1e-3)  # the adapters changed the model


def test_a_decoder_llm_embeds_with_last_token_pooling_and_eos(tmp_path):
    """A causal LM (tiny random Llama) as the encoder: every text ends with EOS (kept when truncating), the last
    real token is pooled whichever side pads, a LoRA fit trains it, and the export encodes the same in
    sentence-transformers (lasttoken pooling, the EOS-appending tokenizer)."""
    from sentence_transformers import SentenceTransformer

    from embedder.modeling.encoder import DualEncoder
    from embedder.scoring.tiny_lm import build_tiny_lm

    lm = build_tiny_lm(str(tmp_path / "lm"))
    enc = DualEncoder(lm, pooling="last_token").eval()
    tok = enc.tokenizer
    ids = tok(["the quick brown fox jumps", "a"], truncation=True, max_length=4)["input_ids"]
    assert all(row[-1] == tok.eos_token_id for row in ids) and len(ids[0]) == 4  # EOS survives truncation
    texts = ["the quick brown fox jumps over the lazy dog", "a lake", "retrieval finds passages"]
    alone = torch.cat([enc.encode_texts([t], kind="key") for t in texts])
    for side in ("right", "left"):
        tok.padding_side = side
        batch = enc.encode(dict(tok(texts, padding=True, return_tensors="pt")), "key")
        assert torch.allclose(batch, alone, atol=1e-5), side
    tok.padding_side = "right"

    base = ["task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "report=false", "trainer=cpu",
            "trainer.max_steps=2", "trainer.max_epochs=-1", "logger=csv", f"output_dir={tmp_path}/out",
            "data.batch_size=2", "data.group_size=2", "query_max_length=32", "key_max_length=32",
            "callbacks.rich_progress_bar=null", "model=tiny_bert", f"model.model_name_or_path={lm}",
            "model.pooling=last_token", "model.unpadded=false", "model.attention_dropout=null",
            "model.lora={r:4,alpha:8,dropout:0.0,target_modules:[q_proj,v_proj]}", "optimizer.lr=1e-2",
            "warmup_ratio=0"]
    run_train(compose(base))
    out = tmp_path / "out"
    from embedder.retrieval.encode.model import load_encoder

    loaded = load_encoder({"_target_": "embedder.modeling.encoder.DualEncoder", "model_name_or_path": str(out)},
                          str(out)).eval()
    assert loaded.pooling == "last_token"  # read back from the export
    ours = loaded.encode_texts(texts, kind="key", max_length=32).numpy()
    st = SentenceTransformer(str(out), device="cpu")
    st.max_seq_length = 32
    theirs = st.encode(texts)
    assert ours.shape == theirs.shape == (3, 32)
    assert np.allclose(ours, theirs, atol=1e-5)
    assert not np.allclose(ours, alone.numpy(), atol=1e-3)  # the fit changed the embeddings


def test_merge_with_the_base_model_before_after_and_export(tmp_path, tiny_bert):
    """merge_base_weight=0.25 (LM-Cocktail style): the export holds 0.75 x the trained weights + 0.25 x the base's,
    and `after` evaluates those merged weights."""
    from safetensors.torch import load_file

    run_train(compose(quick_overrides(tmp_path, tiny_bert, [
        "task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "report=false", "optimizer.lr=1e-2",
        "merge_base_weight=0.25"])))
    trained = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(f"{tiny_bert}/model.safetensors")
    name = next(k for k in exported if k.endswith("layer.0.attention.self.query.weight"))
    t = trained["state_dict"]["encoder.query_model." + name]
    assert not torch.allclose(t, base[name])  # training moved it
    assert torch.allclose(exported[name], 0.75 * t + 0.25 * base[name], atol=1e-6)

    lora = tmp_path / "lora"  # LoRA: the adapters' update is scaled by 0.75, lora_A itself is kept
    run_train(compose(quick_overrides(lora, tiny_bert, [
        "task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "report=false", "optimizer.lr=1e-2", LORA,
        "merge_base_weight=0.25"])))
    sd = torch.load(lora / "out" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    prefix = "encoder.query_model." + name.removesuffix(".weight")
    a, b = sd[prefix + ".lora_A.default.weight"], sd[prefix + ".lora_B.default.weight"]  # the trained adapters
    merged = load_file(str(lora / "out" / "model.safetensors"))[name]
    assert torch.allclose(merged, base[name] + 0.75 * (8 / 4) * (b @ a), atol=1e-5)  # scale alpha / r = 2
    with pytest.raises(ValueError, match="merge_base_weight=1.5: a number between 0 and 1"):
        from embedder.checkpoints import merge_with_base

        merge_with_base(None, None, 1.5)
    # a list of shares is chosen on dev: without a metric computed during training there is nothing to choose on
    with pytest.raises(DataError, match=r"merge_base_weight=\[0, 0.2\] is chosen on optimized_metric"):
        run_train(compose(quick_overrides(tmp_path / "nodev", tiny_bert, [
            "task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "report=false", "merge_base_weight=[0,0.2]"])))
