"""RetrieverModule: the LightningModule that wires the DualEncoder, the losses, the optimizer and evaluation."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from lightning import LightningModule

from embedder.data.kinds import LossSpec, RecordKind
from embedder.errors import DataError
from embedder.evaluation.eval_set import release_trained_stores
from embedder.losses import combine_losses
from embedder.losses.matryoshka import check_dims, truncate
from embedder.modeling.encoder import DualEncoder

log = logging.getLogger(__name__)


class NonFiniteLossError(DataError):
    """The training loss became NaN or infinite."""


class RetrieverModule(LightningModule):
    """Trains a DualEncoder with per-task InfoNCE and distillation losses.

    Args:
        encoder: the DualEncoder to train.
        tasks: `{kind: RecordKind}`; a batch's `task` picks the losses its kind lists (built once, here).
        temperature: the cos temperature tau (scores are divided by it when embeddings are normalised); passed to
            every listed loss that takes it, like the two settings below, unless its entry sets its own.
        cross_device: gather keys across devices (with gradients) as extra negatives.
        in_batch_negatives: score each query against other queries' keys too (InfoNCE).
        combine_rule: `reference` (one active loss is used unweighted) or `weighted` (always apply weights).
        optimizer: a partial optimizer (`torch.optim.AdamW`) called with parameter groups.
        warmup_ratio: linear warmup share of the total steps, then linear decay to 0 (HF Trainer's default).
        weight_decay: applied to all weights except biases and LayerNorm, like HF Trainer.
        eval_sets: evaluation sets run by `validation_step` (see `embedder.evaluation.eval_set`).
        stop_on_nonfinite_loss: a NaN/Inf loss stops the run with `NonFiniteLossError` (step, task, file), so a
            poisoned model is never exported; False lets Lightning go on.
        matryoshka_dims, matryoshka_weights: train every listed leading prefix of the embeddings
            (`embedder.losses.matryoshka`); None: the full embeddings only.
        gradcache_mini_batch: queries per forward pass with GradCache (`embedder.gradcache`): a batch of B queries
            x G keys needs the activation memory of this many queries (and their keys); None: the whole batch.
    """

    def __init__(self, encoder: DualEncoder, tasks: dict[str, RecordKind], temperature: float = 0.01,
                 cross_device: bool = True, in_batch_negatives: bool = True, combine_rule: str = "reference",
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None, warmup_ratio: float = 0.1,
                 weight_decay: float = 0.01, eval_sets: list[Any] | None = None, stop_on_nonfinite_loss: bool = True,
                 matryoshka_dims: list[int] | None = None, matryoshka_weights: list[float] | None = None,
                 gradcache_mini_batch: int | None = None, mask_duplicate_keys: bool = False,
                 directions: list[str] | None = None, mask_known_positives: bool = False):
        super().__init__()
        if combine_rule not in ("reference", "weighted"):
            raise ValueError(f"loss.combine_rule={combine_rule!r}; valid: reference, weighted")
        self.encoder = encoder
        self.tasks = dict(tasks)
        self.temperature = float(temperature) if encoder.normalize else 1.0  # tau only applies to cos (reference)
        self.cross_device, self.in_batch_negatives = bool(cross_device), bool(in_batch_negatives)
        self.combine_rule = combine_rule
        self.optimizer_factory = optimizer
        self.warmup_ratio, self.weight_decay = float(warmup_ratio), float(weight_decay)
        self.eval_sets = list(eval_sets or [])
        self.selecting = False  # a validation that selects (merge_base_weight's candidates): during_fit sets only
        self.stop_on_nonfinite_loss = bool(stop_on_nonfinite_loss)
        self._negatives_logged = False
        self.mask_known_positives = bool(mask_known_positives)
        shared = {"temperature": self.temperature, "cross_device": self.cross_device,
                  "in_batch_negatives": self.in_batch_negatives, "mask_duplicate_keys": bool(mask_duplicate_keys),
                  "directions": directions,  # None: InfoNCELoss's default, [query_to_doc]
                  "mask_known_positives": bool(mask_known_positives)}
        # plain lists, not ModuleDicts: the losses hold no parameters, so checkpoints keep the encoder's keys only
        self.loss_fns = {kind: [(spec, _build_loss(spec, shared)) for spec in t.losses] for kind, t in self.tasks.items()}
        self.matryoshka_dims, self.matryoshka_weights = check_dims(matryoshka_dims, matryoshka_weights, encoder.dim)
        if gradcache_mini_batch is not None and int(gradcache_mini_batch) < 1:
            raise ValueError(f"loss.gradcache_mini_batch={gradcache_mini_batch!r}: a number of queries >= 1, or null")
        self.gradcache_mini_batch = int(gradcache_mini_batch) if gradcache_mini_batch else None
        # LoRA: checkpoints hold the trained (adapter) weights only; the frozen backbone comes from the model path
        self.strict_loading = not getattr(encoder, "lora", None)

    # ------------------------------------------------------------------------------------------ training
    def compute_loss(self, q: torch.Tensor, k: torch.Tensor, teacher_scores: torch.Tensor | None, task: str,
                     key_ids: torch.Tensor | None = None, positive_ids: torch.Tensor | None = None
                     ) -> dict[str, torch.Tensor]:
        """Loss of one batch from its embeddings: q (B, d), k (B*G, d), teacher_scores (B, G) or None, key_ids (B*G,)
        and positive_ids (B, P) or None (the collator's text ids of the keys and of each query's labelled positives,
        for losses that mask duplicate keys or known positives). Every loss the kind lists is active,
        except a teacher-score loss on a batch without scores. With Matryoshka dims, the sum over the prefixes of
        w_d times that loss (logged per dimension as `loss_dim<d>`)."""
        if not self.matryoshka_dims:
            return self._kind_loss(q, k, teacher_scores, task, key_ids, positive_ids)
        out: dict[str, torch.Tensor] = {}
        total = None
        for dim, weight in zip(self.matryoshka_dims, self.matryoshka_weights):
            part = self._kind_loss(truncate(q, dim, self.encoder.normalize), truncate(k, dim, self.encoder.normalize),
                                   teacher_scores, task, key_ids, positive_ids)  # q (B, dim), k (B*G, dim)
            total = weight * part["loss"] if total is None else total + weight * part["loss"]
            out[f"loss_dim{dim}"] = part["loss"].detach()
        out["loss"] = total
        return out

    def _kind_loss(self, q: torch.Tensor, k: torch.Tensor, teacher_scores: torch.Tensor | None, task: str,
                   key_ids: torch.Tensor | None = None, positive_ids: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
        terms, out = [], {}
        for spec, fn in self.loss_fns[task]:
            if getattr(fn, "uses_teacher_scores", False) and teacher_scores is None:
                continue
            extra = {"key_ids": key_ids, "positive_ids": positive_ids} if getattr(fn, "uses_key_ids", False) else {}
            value = fn(q, k, teacher_scores, **extra)  # ()
            terms.append((spec.weight, value))
            name = "loss_distill" if getattr(fn, "uses_teacher_scores", False) else "loss_contrastive"
            out[name if name not in out else f"{name}_{len(terms)}"] = value.detach()
        out["loss"] = combine_losses(terms, self.combine_rule, task)
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        B = batch["query"]["input_ids"].shape[0]
        G = batch["key"]["input_ids"].shape[0] // B
        if self.mask_known_positives and batch.get("positive_ids") is None:
            raise ValueError("loss.mask_known_positives=true but the batches carry no positive_ids: build the "
                             "collator with positive_ids=True (RetrievalDataModule(..., positive_ids=True))")
        if not self._negatives_logged:
            self._log_negatives(B, G)
        m = self.gradcache_mini_batch
        if m is not None and m < B:
            out = self._gradcache_step(batch, m, G)
        else:
            q = self.encoder.encode(batch["query"], "query")  # (B, d)
            k = self.encoder.encode(batch["key"], "key")  # (B*G, d)
            out = self.compute_loss(q, k, batch["teacher_scores"], batch["record_kind"], batch.get("key_ids"),
                                    batch.get("positive_ids"))
        if self.stop_on_nonfinite_loss and not torch.isfinite(out["loss"]):  # one host sync per step
            raise NonFiniteLossError(
                f"the training loss is {float(out['loss'].detach())} at step {self.global_step} (record kind {batch['record_kind']!r}, "
                f"batch {batch_idx} of this epoch); the run stops here and nothing is exported",
                path=batch.get("path"), hint="check the file's teacher_scores and texts, lower optimizer.lr, or "
                "use trainer.precision=bf16-mixed instead of 16-mixed; stop_on_nonfinite_loss=false lets it go on")
        bs = B
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        for name in out:
            if name != "loss":
                self.log(f"train/{name}", out[name], batch_size=bs)
        self.log(f"train/{batch['record_kind']}/loss", out["loss"].detach(), batch_size=bs)
        return out["loss"]

    def _gradcache_across_ranks(self) -> bool:
        return self.gradcache_mini_batch is not None and self._trainer is not None and self.trainer.world_size > 1

    def on_fit_start(self) -> None:
        if self._gradcache_across_ranks():
            from torch.nn.parallel import DistributedDataParallel

            if not isinstance(self.trainer.strategy.model, DistributedDataParallel):
                raise ValueError(f"loss.gradcache_mini_batch works on one device or under DDP (trainer=ddp, "
                                 f"ddp_sim); not with {type(self.trainer.strategy).__name__}, whose gradient "
                                 f"reduction expects one backward pass per step: set loss.gradcache_mini_batch=null")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._gradcache_across_ranks():
            # GradCache backpropagates once per mini-batch, but DDP's reducer expects each parameter's gradient once
            # per step: it is switched off for the step (as `no_sync` does) and on_before_optimizer_step averages
            # the gradients over the ranks instead
            self.trainer.strategy.model.require_backward_grad_sync = False

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._gradcache_across_ranks():  # after all accumulated batches, before clipping: DDP's mean gradient
            from embedder.distributed import average_gradients

            average_gradients([p for p in self.parameters() if p.requires_grad])

    def _gradcache_step(self, batch: dict[str, Any], m: int, G: int) -> dict[str, torch.Tensor]:
        """The batch's loss with GradCache over mini-batches of `m` queries (and their m*G keys)."""
        from embedder.gradcache import gradcache_loss

        B = batch["query"]["input_ids"].shape[0]
        starts = list(range(0, B, m))

        def rows(inputs: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
            return {name: t[lo:hi] for name, t in inputs.items()}

        def encode(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            lo, hi = starts[i], min(starts[i] + m, B)
            return (self.encoder.encode(rows(batch["query"], lo, hi), "query"),  # (m, d)
                    self.encoder.encode(rows(batch["key"], lo * G, hi * G), "key"))  # (m*G, d)

        device = batch["query"]["input_ids"].device
        return gradcache_loss(encode, len(starts),
                              lambda q, k: self.compute_loss(q, k, batch["teacher_scores"], batch["record_kind"],
                                                             batch.get("key_ids"), batch.get("positive_ids")),
                              device_type=device.type)

    def _log_negatives(self, B: int, G: int) -> None:
        world = self.trainer.world_size
        in_batch = (B * world - 1) * G if self.in_batch_negatives else 0
        if not self.cross_device and self.in_batch_negatives:
            in_batch = (B - 1) * G
        log.info("each query sees 1 positive, %d hard negatives and %d in-batch/cross-device keys "
                 "(batch %d per device x %d devices, group %d)", G - 1, in_batch, B, world, G)
        self._negatives_logged = True

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions leave an empty 1-D tensor: its ds_shape
            (no_decay if ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
        # no empty group: DeepSpeed deletes empty groups from the optimizer it wraps, and a scheduler built on both
        # then fails its first step (zip of 2 learning rates with 1 group; LoRA has no trainable 1-D weight)
        groups = [g for g in ({"params": decay, "weight_decay": self.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        opt = self.optimizer_factory(groups) if self.optimizer_factory else torch.optim.AdamW(groups, lr=5e-6)
        from transformers import get_linear_schedule_with_warmup

        # the reference's schedule (HF Trainer): warmup steps = ceil(ratio x total), from lr 0 up, then down to 0
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(np.ceil(self.warmup_ratio * total))
        sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def setup(self, stage: str) -> None:
        if not logging.getLogger().handlers:  # a ddp_spawn worker: Hydra configured logging in the parent only
            logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s][%(name)s][rank {self.global_rank}]"
                                                           f"[%(levelname)s] - %(message)s")

    # ------------------------------------------------------------------------------------------ evaluation
    def validation_step(self, batch: list[int], batch_idx: int) -> None:
        """One batch = one evaluation set index. Under DDP every rank takes part (each encodes and searches its
        share of the corpus, see EvalSet) and ends with the same metrics. During training, sets with
        `during_fit: false` (a test split) are skipped: they are evaluated before and after, never selected on; so
        are they in a validation that selects after training (`selecting`: merge_base_weight's candidates)."""
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        for i in batch:
            es = self.eval_sets[int(i)]
            if (fitting or self.selecting) and not es.during_fit:
                continue
            metrics = es.evaluate(self.encoder, step=self.global_step)
            for name, value in metrics.items():
                self.log(f"val/{es.name}/{name}", float(value), batch_size=1, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        # every set of this validation is scored: older trained stores go, the latest stay for a later evaluation
        # of the same weights (the final state's `after`); sets that share a corpus shared its encoding until here
        release_trained_stores(self.eval_sets, keep_latest=True)

    # ------------------------------------------------------------------------------------------ resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning restores optimizer, scheduler and loops; we add the RNG streams (dropout) so a resumed
        # run continues bit-for-bit like an uninterrupted one.
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(), "numpy": _numpy_state_to_tensors(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        if getattr(self.encoder, "lora", None):  # LoRA: the trained adapters only; a 7B checkpoint is its adapters
            trained = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            np.random.set_state(_numpy_state_from_tensors(states["numpy"]))
            random.setstate(states["python"])
            if states.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])


def _numpy_state_to_tensors() -> tuple:
    # tensors and plain numbers only, so checkpoints load with torch.load(weights_only=True)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _numpy_state_from_tensors(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, cached


def _build_loss(spec: LossSpec, shared: dict[str, Any]) -> torch.nn.Module:
    """Instantiate a listed loss: its own arguments, plus the shared ones (`loss.temperature`, ...) its class takes
    and its entry does not set."""
    import inspect

    from hydra.utils import get_class

    cls = get_class(spec.target)
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in shared.items() if k in params and k not in spec.kwargs}, **dict(spec.kwargs))
