"""Contrastive loss: single-process correctness and 2-rank gloo parity with one process on the full batch.

Semantics under test (see avssl/pretrain/losses.py): each rank returns world * (sum of its rows' losses)
/ (global pair count). So the mean over ranks of the returned losses equals the single-process loss,
and after data-parallel averaging of parameter gradients (DDP / DeepSpeed: sum over ranks / world)
the gradients equal the single-process ones. Input-embedding gradients on a rank are world x the
single-process gradient of its rows (the all_gather backward sums every rank's contribution, and no
averaging happens for activations), which is exactly what makes the parameter gradients match.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from avssl.pretrain.losses import contrastive_loss

WORLD = 2
ROWS = 8  # global batch; 4 rows per rank
# name -> per-row pair validity: all pairs, uneven counts across ranks, one rank without pairs, no pairs at all.
CASES = {
    "all_pairs": [True] * 8,
    "uneven": [True, False, True, True, False, False, True, False],
    "one_rank_empty": [False, False, False, False, True, True, False, True],
    "no_pairs": [False] * 8,
}
BETAS = (0.0, 2.0)  # plain InfoNCE and hard-negative weighting


def _inputs(case: str):
    """Fixed inputs: features of both sides [8, 6], projections [6, 5], log logit scale, validity [8]."""
    g = torch.Generator().manual_seed(sorted(CASES).index(case))
    x_a = torch.randn(ROWS, 6, generator=g)
    x_b = torch.randn(ROWS, 6, generator=g)
    w_a = torch.randn(6, 5, generator=g)
    w_b = torch.randn(6, 5, generator=g)
    log_scale = torch.tensor(2.0)
    return x_a, x_b, w_a, w_b, log_scale, torch.tensor(CASES[case])


def _run(case: str, rows: slice, group_mean_grads: bool, beta: float = 0.0):
    """Loss and gradients for `rows` of the batch; parameter grads averaged over ranks (DDP) when distributed.
    `beta`: the hard-negative weighting (0 = plain InfoNCE)."""
    x_a, x_b, w_a, w_b, log_scale, valid = _inputs(case)
    x_a, x_b = x_a[rows].clone().requires_grad_(), x_b[rows].clone().requires_grad_()
    params = [w_a.requires_grad_(), w_b.requires_grad_(), log_scale.requires_grad_()]
    out = contrastive_loss(x_a @ w_a, x_b @ w_b, valid[rows], log_scale.exp(), hard_negative_beta=beta)
    out.loss.backward()
    grads = [p.grad.clone() for p in params]
    if group_mean_grads:
        for grad in grads:
            torch.distributed.all_reduce(grad)
            grad /= torch.distributed.get_world_size()
    return {
        "loss": out.loss.detach(),
        "accuracy": out.accuracy,
        "n_pairs": out.n_pairs,
        "param_grads": grads,
        "input_grads": [x_a.grad.clone(), x_b.grad.clone()],
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        per_rank = ROWS // WORLD
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        results = {(case, beta): _run(case, rows, group_mean_grads=True, beta=beta) for case in CASES for beta in BETAS}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gloo")
    context = mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("2-rank gloo run did not finish within 120 s")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_single_process_loss_matches_naive_infonce():
    """On one process the loss equals symmetric InfoNCE computed on the valid pairs only (invalid rows are no negatives)."""
    x_a, x_b, w_a, w_b, log_scale, valid = _inputs("uneven")
    a, b = x_a @ w_a, x_b @ w_b
    out = contrastive_loss(a, b, valid, log_scale.exp())
    av, bv = F.normalize(a[valid], dim=-1), F.normalize(b[valid], dim=-1)
    logits = log_scale.exp() * av @ bv.T
    labels = torch.arange(len(av))
    naive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(out.loss, naive, atol=1e-6)
    accuracy = ((logits.argmax(1) == labels).float().mean() + (logits.argmax(0) == labels).float().mean()) / 2
    assert torch.allclose(out.accuracy, accuracy) and out.n_pairs.item() == int(valid.sum())


def test_hard_negative_weighting_matches_its_formula():
    """With beta > 0 each direction's loss is -log(e^s_ii / (e^s_ii + (n - 1) * mean_j w_ij e^s_ij)) over
    the valid negatives j, with w_ij = exp(beta cos_ij) / mean_j exp(beta cos_ij) (Robinson et al. 2021,
    without debiasing); accuracy stays plain retrieval; beta = 0 is InfoNCE again."""
    x_a, x_b, w_a, w_b, log_scale, valid = _inputs("uneven")
    a, b = x_a @ w_a, x_b @ w_b
    av, bv = F.normalize(a[valid], dim=-1), F.normalize(b[valid], dim=-1)
    scale, beta, n = log_scale.exp(), 2.0, int(valid.sum())

    def direction(cos: torch.Tensor) -> torch.Tensor:
        losses = []
        for i in range(n):
            negatives = torch.cat([cos[i, :i], cos[i, i + 1 :]])
            weights = torch.exp(beta * negatives)
            weights = weights / weights.mean()
            losses.append(-(scale * cos[i, i] - torch.log(torch.exp(scale * cos[i, i]) + (weights * torch.exp(scale * negatives)).sum())))
        return torch.stack(losses).mean()

    cos = av @ bv.T
    expected = (direction(cos) + direction(cos.T)) / 2
    out = contrastive_loss(a, b, valid, scale, hard_negative_beta=beta)
    plain = contrastive_loss(a, b, valid, scale)
    assert torch.allclose(out.loss, expected, atol=1e-5), (out.loss, expected)
    assert out.loss > plain.loss  # the hardest negatives weigh more than the mean one
    assert torch.equal(out.accuracy, plain.accuracy)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_gloo_ranks_match_one_process(distributed_results, case, beta):
    """Mean loss over 2 ranks, DDP-averaged parameter grads and per-row input grads / world equal the full-batch single process."""
    reference = _run(case, slice(None), group_mean_grads=False, beta=beta)
    ranks = [results[(case, beta)] for results in distributed_results]
    mean_loss = sum(r["loss"] for r in ranks) / WORLD
    assert torch.allclose(mean_loss, reference["loss"], atol=1e-5), (mean_loss, reference["loss"])
    for r in ranks:
        assert torch.allclose(r["accuracy"], reference["accuracy"]) and r["n_pairs"] == reference["n_pairs"]
        for grad, ref in zip(r["param_grads"], reference["param_grads"], strict=True):
            assert torch.isfinite(grad).all()
            assert torch.allclose(grad, ref, atol=1e-5), (case, grad, ref)
    per_rank = ROWS // WORLD
    for rank, r in enumerate(ranks):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        for grad, ref in zip(r["input_grads"], reference["input_grads"], strict=True):
            assert torch.allclose(grad / WORLD, ref[rows], atol=1e-5)
    if case == "no_pairs":
        assert mean_loss.item() == 0.0 and all(g.abs().sum() == 0 for g in reference["param_grads"])
