"""APH / LoRAPH building blocks: prior noise rule, learning rates, member heads and their training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pfl.data.loader import DeviceData
from pfl.heads.members import (MemberHeads, aph_members, ensemble_probs, linear_layers, loraph_members,
                               train_members)
from pfl.heads.prior import exponent10, noise_std, perturbed, sample_learning_rates
from pfl.models import ModelSpec, build_model

# ---------------------------------------------------------------- prior


@pytest.mark.parametrize(("x", "e"), [(-3.2e-4, -4), (0.05, -2), (1.0, 0), (9.99, 0), (12.0, 1), (1e-3, -3)])
def test_exponent10(x, e):
    assert exponent10(x) == e


def test_noise_std_rule_and_zero_mean_fallbacks():
    # mean 0.05 -> e = -2 -> std = 10 ** (-2 + 0.1)
    assert noise_std(torch.full((4,), 0.05), 0.1) == pytest.approx(10 ** -1.9)
    # mean exactly 0 (symmetric tensor): e from mean(|P|) = 0.3 -> -1
    assert noise_std(torch.tensor([0.3, -0.3]), 0.0) == pytest.approx(0.1)
    assert noise_std(torch.zeros(5), 0.1) == 0.0


def test_perturbed_copies_have_the_rule_std():
    gen = torch.Generator().manual_seed(0)
    base = torch.full((200, 100), 0.02)  # e = -2; std = 10 ** (-2 - 0.5) ~= 0.00316
    out = perturbed(base, 3, -0.5, gen)
    assert out.shape == (3, 200, 100)
    noise = out - base
    assert noise.std().item() == pytest.approx(10 ** -2.5, rel=0.03)
    assert not torch.equal(out[0], out[1])  # members differ


def test_learning_rates_log_uniform_in_bounds_and_seeded():
    lrs = sample_learning_rates(20000, 0.01, 0.1, seed=3)
    assert lrs.min() >= 0.01 and lrs.max() <= 0.1
    # log-uniform: the mean of log10(lr) is the midpoint -1.5, and 1/2 of the draws lie below 10^-1.5
    assert lrs.log10().mean().item() == pytest.approx(-1.5, abs=0.01)
    assert (lrs < 10 ** -1.5).double().mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(sample_learning_rates(5, 0.01, 0.1, 7), sample_learning_rates(5, 0.01, 0.1, 7))
    with pytest.raises(ValueError, match="lower_lr"):
        sample_learning_rates(3, 0.2, 0.1, 0)


# ---------------------------------------------------------------- members


def _cnn_head(num_classes=10):
    torch.manual_seed(0)
    return build_model(ModelSpec("cnn", num_classes)).head


def test_linear_layers_accepts_mlp_heads_only():
    head = _cnn_head()
    assert [layer.out_features for layer in linear_layers(head)] == [512, 10]
    assert len(linear_layers(nn.Linear(4, 2))) == 1
    with pytest.raises(ValueError, match="Linear layers with ReLU"):
        linear_layers(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)))


def test_members_compute_what_their_own_head_computes():
    head = _cnn_head()
    members = aph_members(head, 3, p_lambda=0.1, gen=torch.Generator().manual_seed(1))
    x = torch.randn(5, 1600)
    out = members(x.expand(3, -1, -1))
    for j in range(3):
        ref = nn.Sequential(nn.Linear(1600, 512), nn.ReLU(), nn.Linear(512, 10))
        ref[0].weight.data, ref[0].bias.data = members.layers[0].weight_t[j].T, members.layers[0].bias[j]
        ref[2].weight.data, ref[2].bias.data = members.layers[1].weight_t[j].T, members.layers[1].bias[j]
        assert torch.allclose(out[j], ref(x), atol=1e-5)


def test_aph_members_start_at_the_head_plus_noise():
    head = _cnn_head()
    quiet = aph_members(head, 2, p_lambda=-30.0, gen=torch.Generator().manual_seed(0))
    assert torch.allclose(quiet.layers[0].weight_t[1].T, head[0].weight, atol=1e-12)
    noisy = aph_members(head, 2, p_lambda=0.1, gen=torch.Generator().manual_seed(0))
    diff = noisy.layers[1].weight_t[0].T - head[2].weight
    assert diff.std().item() == pytest.approx(noise_std(head[2].weight, 0.1), rel=0.1)


def test_ensemble_is_the_mean_of_member_softmaxes():
    members = aph_members(_cnn_head(), 4, p_lambda=0.5, gen=torch.Generator().manual_seed(2))
    feats = torch.randn(6, 1600)
    probs = ensemble_probs(members, feats)
    by_hand = sum(torch.softmax(members.member(j)(feats.unsqueeze(0))[0], dim=1) for j in range(4)) / 4
    assert torch.allclose(probs, by_hand, atol=1e-6)
    assert torch.allclose(probs.sum(dim=1), torch.ones(6))


def test_loraph_trains_only_b_and_bias_and_keeps_w0_and_a_frozen():
    head = _cnn_head()
    aph = aph_members(head, 2, 0.1, torch.Generator().manual_seed(0))
    lora = loraph_members(head, 2, rank=8, p_lambda=0.1, init="prior", gen=torch.Generator().manual_seed(0))
    # APH: 1600*512 + 512 + 512*10 + 10; LoRAPH r=8 (A frozen): (512*8 + 512) + (10*8 + 10)
    assert aph.trainable_per_member() == 1600 * 512 + 512 + 512 * 10 + 10 == 824_842
    assert lora.trainable_per_member() == (512 * 8 + 512) + (10 * 8 + 10) == 4_698
    frozen = {n: t.clone() for n, t in lora.named_buffers()}
    assert set(frozen) == {f"layers.{i}.{k}" for i in (0, 1) for k in ("base_weight_t", "a_t")}
    feats, labels = torch.randn(40, 1600), torch.randint(0, 10, (40,))
    before = lora.layers[0].b_t.detach().clone()
    train_members(lora, lambda idx: feats[idx], labels, torch.tensor([0.1, 0.05]), 1, 16, 1e-5, [0, 1])
    assert all(torch.equal(t, frozen[n]) for n, t in lora.named_buffers())  # W0 and A_j frozen
    assert not torch.equal(lora.layers[0].b_t, before)                    # B_j trained
    x = torch.randn(3, 1600)  # a one-member copy slices the per-member A_j too
    assert torch.allclose(lora.member(1)(x.unsqueeze(0))[0], lora(x.expand(2, -1, -1))[1], atol=1e-5)


def test_loraph_rank_is_capped_and_standard_init_starts_at_the_head():
    head = nn.Linear(512, 5)
    lora = loraph_members(head, 3, rank=8, p_lambda=0.1, init="standard", gen=torch.Generator().manual_seed(0))
    assert lora.layers[0].a_t.shape == (3, 512, 5) and lora.layers[0].b_t.shape == (3, 5, 5)  # r = min(8, 5, 512)
    x = torch.randn(4, 512)
    assert torch.allclose(lora(x.expand(3, -1, -1))[2], head(x), atol=1e-5)  # B = 0: W0 + 0
    prior = loraph_members(head, 3, rank=8, p_lambda=0.1, init="prior", gen=torch.Generator().manual_seed(0))
    delta = torch.bmm(prior.layers[0].a_t, prior.layers[0].b_t)  # (B_j A_j).T: entries of APH's noise scale
    assert delta.std().item() == pytest.approx(noise_std(head.weight, 0.1), rel=0.15)
    with pytest.raises(ValueError, match="lora_init"):
        loraph_members(head, 3, rank=8, p_lambda=0.1, init="zeros", gen=torch.Generator())


def test_loraph_first_sgd_step_moves_the_head_like_aph_in_expectation():
    # By hand: head W0 = 0, b0 = 0 (4 inputs, 2 classes), one sample x = (2, 0, 0, 0) of class 0,
    # lr 0.1, no decay. Logits 0 -> p = (1/2, 1/2), output gradient g = p - e_0 = (-1/2, 1/2).
    # APH: W1 = -lr g x^T, b1 = -lr g -> logits on x = -lr g (|x|^2 + 1) = 0.05 * 5 * (1, -1) = (0.25, -0.25).
    # LoRAPH (B0 = 0, so A gets no gradient): B1 = -lr g (A x)^T, b1 = -lr g -> logits on x =
    # -lr g (|A x|^2 + 1), and E|A x|^2 = x^T E[A^T A] x = |x|^2 = 4 since A ~ N(0, 1/r): (0.25, -0.25)
    # on average (a single Linear is the output layer: c = 1). (A ~ N(0, 1/in) would give
    # E|A x|^2 = r/in |x|^2 = 2: (0.15, -0.15).)
    head = nn.Linear(4, 2)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    x, y, lr = torch.tensor([[2.0, 0.0, 0.0, 0.0]]), torch.tensor([0]), 0.1
    aph = aph_members(head, 1, p_lambda=0.1, gen=torch.Generator().manual_seed(0))  # zero tensors: no noise
    train_members(aph, lambda idx: x[idx], y, torch.tensor([lr]), 1, 1, 0.0, [0])
    assert torch.allclose(aph(x.unsqueeze(0))[0, 0], torch.tensor([0.25, -0.25]), atol=1e-6)

    s = 4000
    lora = loraph_members(head, s, rank=8, p_lambda=0.1, init="prior", gen=torch.Generator().manual_seed(0))
    layer = lora.layers[0]
    assert layer.a_t.shape == (s, 4, 2) and not layer.b_t.any()  # r = min(8, 2, 4); W0 = 0: prior std 0
    ax2 = torch.bmm(x.expand(s, -1, -1), layer.a_t).pow(2).sum(dim=2)[:, 0]  # |A_j x|^2, (s,)
    train_members(lora, lambda idx: x[idx], y, torch.full((s,), lr), 1, 1, 0.0, list(range(s)))
    logits = lora(x.expand(s, -1, -1))[:, 0]  # (s, 2)
    assert torch.allclose(logits, lr * 0.5 * (ax2 + 1).unsqueeze(1) * torch.tensor([1.0, -1.0]), atol=1e-6)
    # the members' mean equals APH's step (sd of the mean: 0.2 / sqrt(s) = 0.003)
    assert torch.allclose(logits.mean(dim=0), torch.tensor([0.25, -0.25]), atol=0.015)


def test_loraph_a_scale_is_per_layer_and_prior_keeps_aph_noise_scale():
    # E[A^T A] = c I: the diagonal mean of A^T A (mean squared column norm of A) is c;
    # hidden 1600 -> 512 layer: c = sqrt(8 / 1600); output 512 -> 10 layer: c = 1.
    head = _cnn_head()
    lora = loraph_members(head, 4, rank=8, p_lambda=0.1, init="prior", gen=torch.Generator().manual_seed(0))
    for layer, c in zip(lora.layers, (math.sqrt(8 / 1600), 1.0)):
        assert layer.a_t.pow(2).sum(dim=2).mean().item() == pytest.approx(c, rel=0.03)
    for layer, ref in zip(lora.layers, (head[0], head[2])):  # B_j A_j entries: std sigma in every layer
        delta = torch.bmm(layer.a_t, layer.b_t)
        assert delta.std().item() == pytest.approx(noise_std(ref.weight, 0.1), rel=0.15)


def test_sgd_step_matches_torch_sgd_with_weight_decay():
    head = nn.Linear(6, 3)
    members = aph_members(head, 2, p_lambda=-30.0, gen=torch.Generator().manual_seed(0))
    feats, labels = torch.randn(8, 6), torch.randint(0, 3, (8,))
    lrs = torch.tensor([0.1, 0.02], dtype=torch.float64)
    train_members(members, lambda idx: feats[idx], labels, lrs, epochs=1, batch_size=8, weight_decay=0.01,
                  seeds=[0, 1])
    for j in range(2):  # one full batch: the order does not matter
        ref = nn.Linear(6, 3)
        ref.load_state_dict(head.state_dict())
        opt = torch.optim.SGD(ref.parameters(), lr=float(lrs[j]), weight_decay=0.01)
        nn.functional.cross_entropy(ref(feats), labels).backward()
        opt.step()
        assert torch.allclose(members.layers[0].weight_t[j].T, ref.weight, atol=1e-6)
        assert torch.allclose(members.layers[0].bias[j], ref.bias, atol=1e-6)


def test_cached_feature_training_equals_per_member_full_model_training(cifar10):
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", 10)).eval()
    data = DeviceData(cifar10, torch.device("cpu"))
    train = torch.arange(0, 150)
    labels = data.targets[train]
    lrs = sample_learning_rates(3, 0.01, 0.1, 0)
    seeds = [11, 12, 13]
    together = aph_members(model.head, 3, 0.1, torch.Generator().manual_seed(5))
    alone = [together.member(j) for j in range(3)]
    with torch.no_grad():
        cached = model.base(data.batch(train)[0])
    train_members(together, lambda idx: cached[idx], labels, lrs, 2, 32, 1e-5, seeds)

    def full_model_features(idx):  # no cache: the frozen base runs on every step's images
        with torch.no_grad():
            return torch.stack([model.base(data.batch(train[row])[0]) for row in idx])

    for j, single in enumerate(alone):
        train_members(single, full_model_features, labels, lrs[j:j + 1], 2, 32, 1e-5, [seeds[j]])
        for p_single, p in zip(single.parameters(), together.parameters()):
            assert torch.allclose(p_single[0], p[j], atol=1e-5)


def test_member_heads_reports_member_count():
    members = MemberHeads(aph_members(nn.Linear(3, 2), 4, 0.1, torch.Generator()).layers)
    assert members.num_members == 4
    assert math.prod(members.layers[0].weight_t.shape) == 4 * 2 * 3
