"""Every config group composes, and what can be built on a CPU is instantiated."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf, open_dict

from embedder.record_kinds import build_record_kinds
from tests.conftest import ROOT, compose

GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in (ROOT / "configs").iterdir() if g.is_dir()}


@pytest.mark.parametrize("task", GROUPS["task"])
def test_every_task_composes_and_builds_settings(task):
    cfg = compose([f"task={task}"])
    tasks = build_record_kinds(OmegaConf.to_container(cfg.record_kinds, resolve=True), cfg.data.group_size,
                                OmegaConf.to_container(cfg.version.table), cfg.version.add_instruction)
    assert tasks and (cfg.train_data or task == "beir")  # beir: train_data comes from beir.folder at run time
    for spec in (cfg.eval or {}).values():
        if spec is not None:
            assert spec.record_kind in tasks


def test_task_aliases_match_reference_spellings():
    for alias, target in [("chat", "msc"), ("convsearch", "qrecc"), ("qa", "msmarco"), ("toolbench", "tool")]:
        a, b = compose([f"task={alias}"]), compose([f"task={target}"])
        assert OmegaConf.to_container(a.record_kinds) == OmegaConf.to_container(b.record_kinds)
        assert list(a.train_data) == list(b.train_data)


def test_reference_per_task_settings():
    t = compose(["task=llm-embedder"])
    s = build_record_kinds(OmegaConf.to_container(t.record_kinds, resolve=True), 8)
    assert set(s) == {"qa", "convsearch", "chat", "lrlm", "icl", "tool"}
    targets = {kind: [x.target.rsplit(".", 1)[-1] for x in t.losses] for kind, t in s.items()}
    assert targets["qa"] == ["StableDistillLoss"]  # stable distillation, no contrastive term
    assert s["icl"].sampling.select_positive == "random" and targets["icl"] == ["StableDistillLoss"]
    assert s["qa"].sampling.stable_distill and s["icl"].sampling.stable_distill and not s["chat"].sampling.stable_distill
    assert s["chat"].sampling.select_positive == "teacher" and targets["chat"] == ["KLDistillLoss"]
    assert s["chat"].losses[0].kwargs["teacher_temperature"] == 0.1 and targets["lrlm"] == ["KLDistillLoss"]
    assert s["lrlm"].sampling.max_sample_num == 10000 and s["lrlm"].sampling.teacher_scores_margin == 0.1
    assert targets["tool"] == targets["convsearch"] == ["InfoNCELoss"] and s["tool"].losses[0].weight == 0.2
    assert not s["tool"].needs_teacher_scores and s["qa"].needs_teacher_scores
    assert s["qa"].instruction.query == "Represent this query for retrieving relevant documents: "
    files = list(t.train_data)
    assert len(files) == 10 and files.count("llm-embedder:tool/toolbench/train.json") == 2
    assert t.data.batch_size == 100 and t.trainer.max_steps == 10000 and t.model.gradient_checkpointing
    assert t.data.inbatch_same_dataset == "epoch" and t.optimizer.lr == 5e-6 and t.warmup_ratio == 0.1
    nq = compose(["task=nq"])
    assert (nq.query_max_length, nq.key_max_length) == (32, 128) and list(nq.eval.nq.metrics) == ["nq"]


def test_evaluate_on_own_data_encodes_at_full_lengths():
    """`embedder.evaluate eval_data=...` with no task= runs under the default task (sample): its lengths must be the
    256/256 every training default uses, not a short limit fitted to the bundled sample (a 64/128 limit once cost
    the untrained MiniLM 0.018 nDCG@10 on a SciFact split); a task with its own limits (nq) keeps them."""
    cfg = compose(["eval_data=/data/beir/scifact"], config_name="eval")
    assert (cfg.query_max_length, cfg.key_max_length) == (256, 256)
    train = compose(["task=sample"])
    assert (train.query_max_length, train.key_max_length) == (256, 256)
    nq = compose(["task=nq"], config_name="eval")
    assert (nq.query_max_length, nq.key_max_length) == (32, 128)


@pytest.mark.parametrize("version", GROUPS["version"])
def test_versions(version):
    cfg = compose([f"version={version}", "task=tool"])
    s = build_record_kinds(OmegaConf.to_container(cfg.record_kinds), 8, OmegaConf.to_container(cfg.version.table),
                            cfg.version.add_instruction)["tool"]
    expected = {"bge": "Represent this sentence for searching relevant passages: ", "e5": "query: ", "none": "",
                "llm-embedder": "Transform this user request for fetching helpful tool descriptions: ",
                "qwen3": "Instruct: Given a user request, retrieve tools that can fulfil it\nQuery: "}
    assert s.instruction.query == expected.get(version, s.instruction.query)
    if version == "qwen3":
        assert s.instruction.key == ""  # documents go in as they are


@pytest.mark.parametrize("trainer", GROUPS["trainer"])
def test_trainers_compose(trainer, tmp_path):
    cfg = compose([f"trainer={trainer}", f"output_dir={tmp_path}"])
    assert cfg.trainer._target_ == "lightning.pytorch.trainer.Trainer"
    if trainer in ("cpu", "default", "ddp_sim"):
        t = hydra.utils.instantiate(cfg.trainer, logger=False)
        assert t.world_size == (2 if trainer == "ddp_sim" else 1)
    if trainer.startswith("deepspeed"):
        ds = OmegaConf.to_container(cfg.trainer.strategy.config)
        stage = int(trainer.split("_")[2])
        assert ds["zero_optimization"]["stage"] == stage
        assert "offload_optimizer" not in ds  # the reference's misplaced key
        if trainer.endswith("offload"):
            assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("logger", GROUPS["logger"])
def test_loggers_instantiate(logger, tmp_path):
    cfg = compose([f"logger={logger}", f"output_dir={tmp_path}"])
    for c in cfg.logger.values():
        lg = hydra.utils.instantiate(c)
        assert isinstance(lg, hydra.utils.get_class(c._target_)), c._target_  # the class the key names
        assert os.path.realpath(lg.save_dir) == os.path.realpath(tmp_path)  # next to the run's checkpoints


def test_callbacks_instantiate(tmp_path):
    cfg = compose([f"output_dir={tmp_path}"])
    for c in cfg.callbacks.values():
        cb = hydra.utils.instantiate(c)
        assert isinstance(cb, hydra.utils.get_class(c._target_)), c._target_  # the class the key names
    assert cfg.callbacks.model_checkpoint.dirpath == f"{tmp_path}/checkpoints"


def test_models_compose_and_minilm_instantiates():
    for model in GROUPS["model"]:
        cfg = compose([f"model={model}"])
        assert cfg.model._target_.endswith("DualEncoder")
    enc = hydra.utils.instantiate(compose([]).model)
    assert enc.pooling == "mean" and enc.dim == 384 and Path(enc.model_name_or_path).is_dir()


def test_hparams_search_and_debug_compose():
    for hs in GROUPS.get("hparams_search", []):
        cfg = compose([f"hparams_search={hs}"])
        assert cfg.optimized_metric
    for d in GROUPS["debug"]:
        compose([f"debug={d}"])


def test_unknown_task_lists_options():
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises((MissingConfigException, ConfigCompositionException), match="Available options"):
        compose(["task=weather"])


def test_misspelt_key_lists_valid_keys():
    from embedder.config_check import check_overrides

    msg = check_overrides(str(ROOT / "configs"), "train", ["task=tool", "data.batchsize=3"])
    assert "Unknown config key 'data.batchsize'" in msg and "Did you mean 'data.batch_size'" in msg
    assert "batch_size, group_size" in msg
    msg = check_overrides(str(ROOT / "configs"), "train", ["task=tool", "record_kinds.tool.losess=[]"])
    assert "Did you mean 'record_kinds.tool.losses'" in msg
    assert check_overrides(str(ROOT / "configs"), "train", ["task=tool", "data.batch_size=3",
                                                            "record_kinds.tool.losses.0.weight=0.5"]) is None


@pytest.mark.parametrize("experiment", GROUPS["experiment"])
def test_experiments_compose(experiment):
    cfg = compose([f"experiment={experiment}"])
    assert len(cfg.train_data) == 10 and cfg.model.model_name_or_path == "BAAI/bge-base-en"
    if "slurm" in experiment:
        assert cfg.hydra.launcher.tasks_per_node == cfg.trainer.devices


@pytest.mark.parametrize("trainer", [t for t in GROUPS["trainer"] if t.startswith("deepspeed")])
def test_deepspeed_strategies_instantiate(trainer):
    """As far as a CPU allows: the strategy builds from config with a plain-dict DeepSpeed config."""
    pytest.importorskip("deepspeed")
    strategy = hydra.utils.instantiate(compose([f"trainer={trainer}"]).trainer.strategy)
    assert isinstance(strategy.config, dict)
    assert strategy.config["zero_optimization"]["stage"] == int(trainer.split("_")[2])
    assert strategy.zero_stage_3 == trainer.endswith("stage_3")
    assert strategy.config["zero_allow_untested_optimizer"] is True

    def strings(node):
        if isinstance(node, dict):
            return [x for v in node.values() for x in strings(v)]
        return [node] if isinstance(node, str) else []

    assert "auto" not in strings(strategy.config)  # HF-Trainer placeholders mean nothing to DeepSpeed itself
    from deepspeed.runtime.config import DeepSpeedConfig

    # what Lightning adds before handing the config over: precision block and gradient clipping
    parsed = DeepSpeedConfig({**strategy.config, "bf16": {"enabled": True}, "gradient_clipping": 1.0})
    assert parsed.zero_optimization_stage == int(trainer.split("_")[2])
    assert parsed.train_micro_batch_size_per_gpu == 16
    if trainer.endswith("offload"):
        assert parsed.zero_config.offload_optimizer.device == "cpu"


def test_renamed_keys_keep_their_old_spelling_for_one_release():
    """The old spellings are rewritten to the new keys on the command line, with a warning naming both."""
    from embedder.config_check import DEPRECATED_KEYS, rename_deprecated

    out, warnings = rename_deprecated("mine", ["eval_data=a.json", "task=qa", "+index.metric=ip", "hits=5"])
    assert out == ["input_data=a.json", "instruction_kind=qa", "+index.similarity=ip", "hits=5"]
    assert len(warnings) == 3 and "`eval_data` is deprecated" in warnings[0] and "`input_data`" in warnings[0]
    assert rename_deprecated("eval", ["eval_data=x", "eval_task=qa"])[0] == ["eval_data=x", "instruction_kind=qa"]
    assert rename_deprecated("score", ["default_task=qa"])[0] == ["default_record_kind=qa"]
    assert rename_deprecated("train", ["task=tool", "default_task=tool"])[0] == ["task=tool", "default_record_kind=tool"]
    # the "task" names that were not the config group: a recipe's name and metric, record kinds, an eval set's kind
    out, warnings = rename_deprecated("train", ["task_label=x", "task_metric=val/qa/mrr@10", "~tasks.qa.instruction",
                                                "+eval.qa.task=qa", "tasks.chat.loss.distill_weight=0"])
    assert out == ["recipe_name=x", "recipe_metric=val/qa/mrr@10", "~record_kinds.qa.instruction",
                   "+eval.qa.record_kind=qa", "++record_kinds.chat.loss.distill_weight=0"] and len(warnings) == 6
    assert "record_kinds.chat.losses" in warnings[-1]  # the old loss block: force-added, then folded into the list
    assert rename_deprecated("eval", ["instruction_task=qa", "task=tool"])[0] == ["instruction_kind=qa", "task=tool"]
    for name, renames in DEPRECATED_KEYS.items():  # every new name exists in its config
        cfg = compose([], name)
        for new in renames.values():
            node = cfg
            for part in new.split("."):
                part = next(iter(node)) if part == "*" else part  # an eval set's name: the first set
                assert part in node, (name, new)
                node = node[part]


def test_a_users_own_task_yaml_with_old_names_still_runs():
    """Old names in a config file (task_label:, task_metric:, tasks:, an eval set's task:) move to the new keys."""
    from embedder.config_check import migrate_renamed_keys

    cfg = compose(["task=sample"])
    with open_dict(cfg):  # what Hydra composes from an old-style configs/task/my_faq.yaml
        cfg.merge_with(OmegaConf.create({
            "task_label": "my_faq", "task_metric": "val/faq/ndcg@10",
            "tasks": {"faq": {"instruction": {"query": "q: ", "key": "k: "}}, "qa": {"loss": {"distill_weight": 0.0}}},
            "eval": {"faq": {"eval_data": "faq.json", "corpus": "c.json", "task": "faq"}}}))
    warnings = migrate_renamed_keys(cfg, "train")
    assert len(warnings) == 4 and all("deprecated" in w for w in warnings)
    assert "task_label" not in cfg and "tasks" not in cfg and "task" not in cfg.eval.faq
    assert cfg.recipe_name == "my_faq" and cfg.recipe_metric == "val/faq/ndcg@10"
    assert cfg.eval.faq.record_kind == "faq" and cfg.record_kinds.faq.instruction.query == "q: "
    assert cfg.record_kinds.qa.loss.distill_weight == 0.0  # merged over the included kind, which keeps the rest
    from embedder.record_kinds import build_record_kinds  # and the old loss block is folded into its losses

    qa = build_record_kinds(OmegaConf.to_container(cfg.record_kinds, resolve=True), 4)["qa"]
    assert qa.losses == () and not qa.needs_teacher_scores  # msmarco's distillation, turned off by the old key
    assert cfg.record_kinds.qa.sampling is not None and "tool" in cfg.record_kinds
    assert cfg.output_dir.endswith("my_faq")  # interpolations see the moved value


@pytest.mark.slow
def test_an_old_spelling_still_runs_from_the_command_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "score.py", "eval_data=/nonexistent.json", "--cfg", "job"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "input_data: /nonexistent.json" in proc.stdout
    assert "`eval_data` is deprecated" in proc.stderr


def test_score_yaml_is_checked_against_its_structured_config(tmp_path):
    """score.yaml extends ScoreConfig (ConfigStore `score_schema`): its values are typed and a wrong type is one
    error naming the key; the schema's defaults are ScoreSettings' (the one place they live)."""
    import dataclasses
    import subprocess
    import sys

    from hydra.errors import ConfigCompositionException

    from embedder.scoring.settings import ScoreConfig, ScoreSettings

    cfg = compose([], "score")
    assert OmegaConf.get_type(cfg) is ScoreConfig and isinstance(cfg.batch_size, int)
    settings = {f.name: f.default for f in dataclasses.fields(ScoreSettings)}
    for f in dataclasses.fields(ScoreConfig):
        if settings.get(f.name, dataclasses.MISSING) is not dataclasses.MISSING and f.name not in ("output_dir", "data_root"):
            assert f.default == settings[f.name], f.name
    with pytest.raises(ConfigCompositionException, match="max_tokens_per_batch"):
        compose(["max_tokens_per_batch=lots"], "score")
    with pytest.raises(Exception, match="Key 'batchsize' not in 'ScoreConfig'"):  # as a user's YAML would add it
        OmegaConf.merge(OmegaConf.structured(ScoreConfig), {"batchsize": 3})
    proc = subprocess.run([sys.executable, "score.py", "part_size=many"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "full_key: part_size" in proc.stderr and "Traceback" not in proc.stderr
