"""GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup";
sentence-transformers' `CachedMultipleNegativesRankingLoss`): a contrastive batch of B queries x G keys in the memory
of one mini-batch.

1. Every mini-batch is encoded without a graph (the RNG state before each is kept, so dropout can be replayed).
2. The loss is computed on those embeddings, made leaves that require grad, and its gradient with respect to each
   embedding is cached (cross-device negatives included: the gather in the loss is autograd-aware).
3. When the returned loss is backpropagated, each mini-batch is encoded again with a graph, under the same RNG
   state and autocast as in step 1, and backpropagated with its cached embedding gradients, one at a time.

The parameter gradients equal those of the uncached loss over the whole batch (tests/test_gradcache.py: to 1e-5 on
CPU, on one process and on 2 gloo ranks); the cost is one extra forward pass of the encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _rng_state() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def gradcache_loss(encode: Callable[[int], tuple[Tensor, Tensor]], n_chunks: int,
                   loss_fn: Callable[[Tensor, Tensor], dict[str, Tensor]], device_type: str = "cpu"
                   ) -> dict[str, Tensor]:
    """The loss dict of `loss_fn(q (B, d), k (B*G, d))` over all `n_chunks` mini-batches, whose `"loss"`, when
    backpropagated, puts into the encoder's parameters the gradients of the uncached loss (see the module docstring).

    `encode(i)`: the i-th mini-batch's `(q_i (m, d), k_i (m*G, d))` embeddings, with a graph when grad is enabled.
    """
    autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    states, q_parts, k_parts = [], [], []
    with torch.no_grad():
        for i in range(n_chunks):
            states.append(_rng_state())
            q_i, k_i = encode(i)
            q_parts.append(q_i)
            k_parts.append(k_i)
    q = torch.cat(q_parts).detach().float().requires_grad_()  # (B, d)
    k = torch.cat(k_parts).detach().float().requires_grad_()  # (B*G, d)
    with torch.enable_grad():
        out = loss_fn(q, k)
        grad_q, grad_k = torch.autograd.grad(out["loss"], [q, k])  # (B, d), (B*G, d): the cached gradients
    q_rows = [p.shape[0] for p in q_parts]
    k_rows = [p.shape[0] for p in k_parts]

    def replay(grad_output: Tensor) -> None:
        """Backward of the returned loss: re-encode each mini-batch with a graph and push its cached gradient."""
        saved = _rng_state()
        q_start = k_start = 0
        for i in range(n_chunks):
            _set_rng_state(states[i])
            with torch.enable_grad(), torch.autocast(device_type, dtype=autocast[1], enabled=autocast[0]):
                q_i, k_i = encode(i)
            gq = grad_q[q_start:q_start + q_rows[i]] * grad_output
            gk = grad_k[k_start:k_start + k_rows[i]] * grad_output
            torch.autograd.backward([q_i, k_i], [gq.to(q_i.dtype), gk.to(k_i.dtype)])
            q_start, k_start = q_start + q_rows[i], k_start + k_rows[i]
        _set_rng_state(saved)  # the stream goes on as if each mini-batch had been encoded once

    loss = out["loss"].detach().requires_grad_()
    loss.register_hook(replay)
    return {**{k: v.detach() for k, v in out.items() if k != "loss"}, "loss": loss}
