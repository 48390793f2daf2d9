"""Cross-device losses on a 2-process gloo group (CPU) must equal the single-process loss on the whole batch.

The lesson of sentence-transformers #3453: a gather that puts keys in the wrong order only shows up with hard
negatives, so the data has G=4 keys per query (positive + 3 negatives), all distinct from each other and from
other queries' keys. Each rank encodes its half of the queries and their key groups with the same tiny linear
"encoder", computes the loss with ``cross_device=True``, backpropagates, then averages the loss and the parameter
gradients over ranks (what DDP does). That must match one process computing the loss on all queries.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from embedder.distributed import gather_no_grad, gather_with_grad, is_distributed, rank_offset
from embedder.losses import InfoNCELoss, KLDistillLoss, StableDistillLoss

WORLD = 2
LOCAL_B = 3  # local queries per rank
G = 4  # positive + 3 hard negatives
D_IN, D_OUT = 6, 5
TEMPERATURE = 0.05
GTE = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
EXTRA_POSITIVES = {0: (LOCAL_B + 1) * G + 2, LOCAL_B + 2: LOCAL_B * G}  # query -> the key row of a second positive


def _data() -> dict[str, torch.Tensor]:
    """All queries' features, their key groups (query b: rows b*G..b*G+G-1) and teacher scores."""
    g = torch.Generator().manual_seed(1234)
    n = WORLD * LOCAL_B
    xk, ids = torch.randn(n * G, D_IN, generator=g), _key_ids(n)  # (W*B*G, d_in), (W*B*G,)
    first = {}
    for row, i in enumerate(ids.tolist()):  # a repeated text is the same key: the same features
        xk[row] = xk[first.setdefault(i, row)]
    xq = xk[::G] + 0.5 * torch.randn(n, D_IN, generator=g)  # (W*B, d_in)
    for b, row in EXTRA_POSITIVES.items():  # a query with a second labelled positive is near it too
        xq[b] += xk[row]
    return {
        # each query near its positive (as after some training): its positive scores high, and so does a repeat
        "xq": xq,
        "xk": xk,
        "teacher": torch.randn(n, G, generator=g) * 2,  # (W*B, G)
        "ids": ids,  # text ids of the keys, with duplicates
        "positive_ids": _positive_ids(ids, n),  # (W*B, 2) each query's labelled positives
    }


def _positive_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Each query's labelled positives: its own positive twice (a padded row), except two queries with a second
    one among the batch's keys: rank 0's query 0 has a hard negative of rank 1's query 1 (across ranks), and rank
    1's query 2 has the positive of rank 1's query 0 (same rank)."""
    rows = ids[::G].unsqueeze(1).repeat(1, 2)  # (n, 2)
    for b, row in EXTRA_POSITIVES.items():
        rows[b, 1] = ids[row]
    return rows


def _key_ids(n: int) -> torch.Tensor:
    """Every key its own text, except two repeats of a positive: rank 1's first query has rank 0's first positive
    as a hard negative (across ranks), and rank 0's query 1 has query 2's positive (same rank)."""
    ids = torch.arange(n * G)
    ids[LOCAL_B * G + 1] = ids[0]
    ids[1 * G + 2] = ids[2 * G]
    return ids


def _encoder() -> nn.Linear:
    torch.manual_seed(0)  # same weights on every rank, like DDP's initial broadcast
    return nn.Linear(D_IN, D_OUT)


def _losses(cross_device: bool) -> dict[str, nn.Module]:
    return {
        "infonce": InfoNCELoss(temperature=TEMPERATURE, cross_device=cross_device),
        "infonce_masked": InfoNCELoss(temperature=TEMPERATURE, cross_device=cross_device, mask_duplicate_keys=True),
        # GTE's loss: the gathered queries enter the denominator as well (query_to_query, doc_to_query)
        "infonce_gte": InfoNCELoss(temperature=TEMPERATURE, cross_device=cross_device, directions=GTE),
        "infonce_gte_masked": InfoNCELoss(temperature=TEMPERATURE, cross_device=cross_device, directions=GTE,
                                          mask_duplicate_keys=True),
        "infonce_known": InfoNCELoss(temperature=TEMPERATURE, cross_device=cross_device, mask_known_positives=True),
        "stable": StableDistillLoss(temperature=TEMPERATURE, teacher_temperature=0.5, cross_device=cross_device),
        "kl": KLDistillLoss(temperature=TEMPERATURE, teacher_temperature=0.5),
    }


def _loss_and_grads(loss_fn: nn.Module, xq, xk, teacher, ids=None, positive_ids=None
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    encoder = _encoder()
    q = F.normalize(encoder(xq), dim=-1)  # (B, d)
    k = F.normalize(encoder(xk), dim=-1)  # (B*G, d)
    extra = {"key_ids": ids, "positive_ids": positive_ids} if getattr(loss_fn, "uses_key_ids", False) else {}
    loss = loss_fn(q, k, teacher, **extra)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in encoder.parameters()]


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        data = _data()
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)  # this rank's queries
        key_rows = slice(rank * LOCAL_B * G, (rank + 1) * LOCAL_B * G)  # and their key groups
        xq, xk, teacher, ids = data["xq"][rows], data["xk"][key_rows], data["teacher"][rows], data["ids"][key_rows]
        positive_ids = data["positive_ids"][rows]

        results: dict[str, object] = {"offset": rank_offset(LOCAL_B), "is_distributed": is_distributed()}
        # helpers: rank order of the concatenation and gradient routing back to the owner
        x = torch.full((2, 3), float(rank), requires_grad=True)
        gathered = gather_with_grad(x)  # (W*2, 3)
        (gathered * torch.arange(1.0, WORLD * 2 + 1)[:, None]).sum().backward()
        results["gathered"] = gathered.detach()
        results["gather_grad"] = x.grad.clone()  # summed over ranks: WORLD * (row weights of this rank's rows)
        results["gathered_no_grad"] = gather_no_grad(torch.tensor([rank]))

        for cross_device in (True, False):
            for name, loss_fn in _losses(cross_device).items():
                loss, grads = _loss_and_grads(loss_fn, xq, xk, teacher, ids, positive_ids)
                for t in [loss, *grads]:  # DDP averages gradients; we average the logged loss the same way
                    dist.all_reduce(t)
                    t /= WORLD
                results[f"{name}/{cross_device}"] = (loss, grads)
        if rank == 0:
            torch.save(results, out_path)
        else:
            results_rank1 = {"offset": results["offset"], "gather_grad": results["gather_grad"]}
            torch.save(results_rank1, out_path + ".rank1")
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = str(tmp_path_factory.mktemp("ddp") / "results.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=False), torch.load(out + ".rank1", weights_only=False)


def test_gather_helpers(ddp_results):
    rank0, rank1 = ddp_results
    assert rank0["is_distributed"] and rank0["offset"] == 0 and rank1["offset"] == LOCAL_B
    expected = torch.tensor([0.0, 0.0, 1.0, 1.0])[:, None].expand(4, 3)  # rank 0's rows first, then rank 1's
    assert torch.equal(rank0["gathered"], expected)
    # d(sum over ranks of sum(w * gathered))/dx_r = WORLD * w[rows of rank r]
    assert torch.equal(rank0["gather_grad"], WORLD * torch.tensor([1.0, 2.0])[:, None].expand(2, 3))
    assert torch.equal(rank1["gather_grad"], WORLD * torch.tensor([3.0, 4.0])[:, None].expand(2, 3))
    assert torch.equal(rank0["gathered_no_grad"], torch.tensor([0, 1]))


def test_helpers_are_identity_outside_a_process_group():
    x = torch.randn(3, 2)
    assert not is_distributed()
    assert gather_with_grad(x) is x and torch.equal(gather_no_grad(x), x) and rank_offset(7) == 0


@pytest.mark.parametrize("name", ["infonce", "infonce_masked", "infonce_gte", "infonce_gte_masked", "infonce_known",
                                  "stable", "kl"])
def test_cross_device_loss_equals_single_process(ddp_results, name):
    data = _data()
    single_loss, single_grads = _loss_and_grads(_losses(cross_device=True)[name], data["xq"], data["xk"],
                                                data["teacher"], data["ids"], data["positive_ids"])
    ddp_loss, ddp_grads = ddp_results[0][f"{name}/True"]
    assert torch.allclose(ddp_loss, single_loss, atol=1e-5)
    for ddp_grad, single_grad in zip(ddp_grads, single_grads):
        assert torch.allclose(ddp_grad, single_grad, atol=1e-5)


@pytest.mark.parametrize("name", ["infonce", "infonce_gte", "stable"])
def test_without_cross_device_the_losses_differ(ddp_results, name):
    """Sanity check that the comparison has power: local-only negatives give a different objective."""
    data = _data()
    single_loss, _ = _loss_and_grads(_losses(cross_device=True)[name], data["xq"], data["xk"], data["teacher"])
    local_loss, _ = ddp_results[0][f"{name}/False"]
    assert not torch.allclose(local_loss, single_loss, atol=1e-4)


def test_one_place_reads_the_launcher_environment(monkeypatch):
    from embedder import distributed

    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "SLURM_LOCALID", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert (distributed.launched_rank(), distributed.launched_world_size(), distributed.local_rank()) == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed.launched_rank() == 5 and distributed.launched_world_size() == 1  # SLURM alone: no torchrun
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (distributed.launched_rank(), distributed.launched_world_size(), distributed.local_rank()) == (3, 4, 1)


def test_masking_duplicate_keys_leaves_out_exactly_the_repeated_positives(ddp_results):
    """The masked loss equals cross-entropy over each query's candidates without the keys that repeat its positive
    (two here: one on the other rank); it differs from the unmasked loss, on one process and on 2 ranks alike."""
    data = _data()
    encoder = _encoder()
    with torch.no_grad():
        q = F.normalize(encoder(data["xq"]), dim=-1)  # (n, d)
        k = F.normalize(encoder(data["xk"]), dim=-1)  # (n*G, d)
    ids, n = data["ids"], q.size(0)
    scores = q @ k.T / TEMPERATURE  # (n, n*G)
    terms = []
    for b in range(n):
        keep = [j for j in range(n * G) if j == b * G or ids[j] != ids[b * G]]
        terms.append(-torch.log_softmax(scores[b, keep], dim=0)[keep.index(b * G)])
    expected = torch.stack(terms).mean()
    masked = InfoNCELoss(TEMPERATURE, cross_device=False, mask_duplicate_keys=True)(q, k, key_ids=ids)
    assert torch.allclose(masked, expected, atol=1e-6)
    assert sum(len(range(n * G)) - 1 - (ids != ids[b * G]).sum().item() for b in range(n)) == 2  # two repeats
    plain = InfoNCELoss(TEMPERATURE, cross_device=False)(q, k, key_ids=ids)
    assert abs(float(plain) - float(masked)) > 1e-3
    assert not torch.allclose(ddp_results[0]["infonce_masked/True"][0], ddp_results[0]["infonce/True"][0], atol=1e-4)


def test_masking_applies_inside_a_group_without_in_batch_negatives():
    """With in_batch_negatives=false a hard negative that is the positive's own text is left out too."""
    q, k = torch.eye(2, 4), torch.eye(4)[[0, 0, 1, 3]]  # query 0's negative is its positive's text (and vector)
    ids = torch.tensor([7, 7, 8, 9])
    masked = InfoNCELoss(1.0, in_batch_negatives=False, mask_duplicate_keys=True)(q, k, key_ids=ids)
    expected = (0.0 + -math.log(math.e / (math.e + 1))) / 2  # query 0: only its positive left; query 1 as usual
    assert masked.item() == pytest.approx(expected, abs=1e-6)



def test_masking_known_positives_leaves_out_every_labelled_positive(ddp_results):
    """The loss with mask_known_positives equals cross-entropy over each query's candidates without the keys that
    are one of its labelled positives: the repeats of its drawn positive (two) and the other positives it lists
    (two, one on the other rank); it differs from the unmasked and the duplicate-masked loss, on 2 ranks alike."""
    data = _data()
    encoder = _encoder()
    with torch.no_grad():
        q = F.normalize(encoder(data["xq"]), dim=-1)  # (n, d)
        k = F.normalize(encoder(data["xk"]), dim=-1)  # (n*G, d)
    ids, positives, n = data["ids"], data["positive_ids"], q.size(0)
    scores = q @ k.T / TEMPERATURE  # (n, n*G)
    terms, left_out = [], 0
    for b in range(n):
        keep = [j for j in range(n * G) if j == b * G or int(ids[j]) not in positives[b].tolist()]
        left_out += n * G - len(keep)
        terms.append(-torch.log_softmax(scores[b, keep], dim=0)[keep.index(b * G)])
    assert left_out == 4
    known = InfoNCELoss(TEMPERATURE, cross_device=False, mask_known_positives=True)(q, k, key_ids=ids,
                                                                                   positive_ids=positives)
    assert torch.allclose(known, torch.stack(terms).mean(), atol=1e-6)
    masked = InfoNCELoss(TEMPERATURE, cross_device=False, mask_duplicate_keys=True)(q, k, key_ids=ids)
    assert abs(float(known) - float(masked)) > 1e-3
    results = ddp_results[0]
    for other in ("infonce", "infonce_masked"):
        assert not torch.allclose(results["infonce_known/True"][0], results[f"{other}/True"][0], atol=1e-4)


def test_masking_known_positives_applies_inside_a_group_without_in_batch_negatives():
    """With in_batch_negatives=false a hard negative that is another of the query's labelled positives is left out."""
    q, k = torch.eye(2, 4), torch.eye(4)[[0, 2, 1, 3]]
    ids = torch.tensor([7, 8, 9, 10])
    positives = torch.tensor([[7, 8], [9, 9]])  # query 0 lists its hard negative's text as a positive too
    known = InfoNCELoss(1.0, in_batch_negatives=False, mask_known_positives=True)(q, k, key_ids=ids,
                                                                                  positive_ids=positives)
    expected = (0.0 + -math.log(math.e / (math.e + 1))) / 2  # query 0: only its positive left; query 1 as usual
    assert known.item() == pytest.approx(expected, abs=1e-6)
