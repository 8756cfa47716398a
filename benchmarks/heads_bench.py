"""Benchmark: APH on cached base features vs a naive per-head loop that runs the full model each step.

Both fine-tune the same members (same initial heads, learning rates, batch orders, epochs)
on the clients of a finished FL run, in the same process, one after the other:

* ``cached``: :func:`pfl.heads.rearrange.rearrange_client` (base features computed once,
  all S heads trained together with batched matmuls);
* ``naive``: for each head, a copy of the client's model with that head, SGD on the head
  parameters, the frozen base run on every step's images (what a hand-written script does).

Prints per-client seconds of each, the ratio naive / cached, and the peak RSS. Usage::

    .venv/bin/python benchmarks/heads_bench.py --run-id <FL run id> [--clients 5] [key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

import torch
from torch import nn

from pfl import tracking
from pfl.config import load_head_config
from pfl.data.loader import DeviceData
from pfl.heads.members import MemberHeads, linear_layers
from pfl.heads.rearrange import build_members, rearrange_client
from pfl.heads.prior import sample_learning_rates
from pfl.heads.run import fl_config
from pfl.seed import derive_seed
from pfl.train import prepare


def _load_member(model: nn.Module, members: MemberHeads, j: int) -> nn.Module:
    """A copy of ``model`` whose head holds member ``j``'s initial weights (APH members only)."""
    single = copy.deepcopy(model)
    with torch.no_grad():
        for layer, stacked in zip(linear_layers(single.head), members.layers):
            layer.weight.copy_(stacked.weight_t[j].T)
            layer.bias.copy_(stacked.bias[j])
    return single


def naive_client(model, data: DeviceData, train, test, hc, client_id: int) -> float:
    """Seconds of the naive loop for one client: S sequential heads, full model forward every step."""
    start = time.perf_counter()
    members = build_members(model, hc, torch.Generator().manual_seed(derive_seed(hc.seed, "head_members", client_id)))
    lrs = sample_learning_rates(hc.sampling_num, hc.lower_lr, hc.upper_lr, derive_seed(hc.seed, "head_lrs", client_id))
    probs = 0
    for j in range(hc.sampling_num):
        net = _load_member(model, members, j).to(data.device).eval()
        net.base.requires_grad_(False)
        opt = torch.optim.SGD(net.head.parameters(), lr=float(lrs[j]), weight_decay=hc.weight_decay)
        gen = torch.Generator().manual_seed(derive_seed(hc.seed, "head_batches", client_id, j))
        for _ in range(hc.global_epoch):
            order = train[torch.randperm(len(train), generator=gen)]
            for b in range(0, len(order), hc.batch_size):
                x, y = data.batch(order[b:b + hc.batch_size])
                loss = nn.functional.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            probs = probs + torch.softmax(net(data.batch(test)[0]), dim=1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", required=True, help="FL run id whose client models to use")
    parser.add_argument("--clients", type=int, default=0, help="first N clients only (0 = all)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("overrides", nargs="*", help="head settings, e.g. global_epoch=10 sampling_num=10")
    args = parser.parse_args()
    hc = load_head_config(args.overrides, method="aph")
    tracking.configure_tracking(args.tracking_uri)
    inputs = tracking.fl_run_inputs(args.run_id)
    prepared = prepare(fl_config(inputs.config, hc))
    data = DeviceData(prepared.dataset, prepared.device)
    clients = range(args.clients or inputs.num_clients)
    print(f"APH, {hc.sampling_num} heads x {hc.global_epoch} epochs, batch {hc.batch_size}, "
          f"{len(clients)} clients, {torch.get_num_threads()} threads, device {prepared.device}")
    print(f"{'client':>6} {'n_train':>7} {'cached s':>9} {'naive s':>9} {'ratio':>6}")
    totals = [0.0, 0.0]
    for cid in clients:
        split = prepared.partition.clients[cid]
        train, test = split.train.to(data.device), split.test.to(data.device)
        model = tracking.load_client_model(args.run_id, cid)
        cached = rearrange_client(model, data, train, test, hc, cid).seconds
        naive = naive_client(model, data, train, test, hc, cid)
        totals[0] += cached
        totals[1] += naive
        print(f"{cid:>6} {len(train):>7} {cached:>9.2f} {naive:>9.2f} {naive / cached:>6.2f}", flush=True)
    print(f"{'total':>6} {'':>7} {totals[0]:>9.2f} {totals[1]:>9.2f} {totals[1] / totals[0]:>6.2f}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
