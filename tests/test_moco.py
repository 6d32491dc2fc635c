"""MoCo v1 and v2 (arXiv 1911.05722, 2003.04297; facebookresearch/moco) built through
``sslhub.create_model(preset, task="pretraining")``.

Each test checks one rule of the paper / official code against numbers computed here: the momentum update of the key
encoder (applied by the trainer through ``momentum_pairs`` / ``momentum_at``), the queue, the v1 head, temperature and
views, the released encoder, and that one optimisation step lowers the loss on a fixed batch. The loss equation itself
is checked in test_losses.py; here it is only given the tensors the method should feed it.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_params_equal, assert_released_is, build, params, perturb_
from torch import nn
from torchvision.transforms import v2

from sslhub.batch import Batch
from sslhub.losses import info_nce_with_queue
from sslhub.methods import TrainingProgress
from sslhub.methods.base import update_momentum_pairs

BATCH = 4
QUERY, KEY = ("encoder_q.", "head_q."), ("encoder_k.", "head_k.")


pytestmark = pytest.mark.usefixtures("single_thread")


def build_moco(**overrides):
    return build("moco_v2_resnet18_32px", queue_size=64, **overrides)


def images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def moco_views():
    x = images(BATCH, 3, 32, 32)
    return [x, x + 0.1 * images(BATCH, 3, 32, 32, seed=1)]


def key_name_to_query(name):
    return name.replace("_k.", "_q.", 1)


@torch.no_grad()
def moco_embeddings(method, views):
    """Normalised query and key embeddings, recomputed in the method's current mode."""
    query = F.normalize(method.head_q(method.encoder_q(views[0])), dim=1)
    key = F.normalize(method.head_k(method.encoder_k(views[1])), dim=1)
    return query, key


# ---- momentum encoder, loss and queue ---------------------------------------------------------------------------
def test_moco_key_encoder_is_momentum_update_of_query_encoder():
    """Eq. 2, θ_k ← m θ_k + (1 - m) θ_q over the encoder and the head, applied by the trainer after each optimizer
    step with ``momentum_at``; the forward pass itself leaves both encoders alone."""
    method = build_moco(momentum=0.9).method.train()
    perturb_(method, KEY)
    query, key = params(method, QUERY), params(method, KEY)
    method(Batch.of(moco_views()))
    assert_params_equal(params(method, KEY), key)
    assert_params_equal(params(method, QUERY), query)
    momentum = method.momentum_at(TrainingProgress(37, 500, 10))
    assert momentum == 0.9  # constant (--moco-m), no schedule
    update_momentum_pairs(method.momentum_pairs(), momentum)
    expected_key = {n: 0.9 * k + 0.1 * query[key_name_to_query(n)] for n, k in key.items()}
    assert_params_equal(params(method, KEY), expected_key)
    assert_params_equal(params(method, QUERY), query)


def test_moco_loss_is_info_nce_of_the_key_encoder_against_the_queue_before_enqueue():
    method = build_moco(temperature=0.3).method.train()
    perturb_(method, KEY)
    queue = method.queue.clone()
    loss = method(Batch.of(moco_views())).loss
    query, key = moco_embeddings(method, moco_views())
    torch.testing.assert_close(loss, info_nce_with_queue(query, key, queue, 0.3))


@pytest.mark.parametrize("start", [0, 62])
def test_moco_enqueues_normalised_keys_at_pointer_with_wrap_around(start):
    method = build_moco().method.train()
    method.queue_ptr.fill_(start)
    queue = method.queue.clone()
    method(Batch.of(moco_views()))
    _, key = moco_embeddings(method, moco_views())
    written = [(start + i) % 64 for i in range(BATCH)]
    torch.testing.assert_close(method.queue[written], key)
    torch.testing.assert_close(method.queue[written].norm(dim=1), torch.ones(BATCH))
    untouched = [i for i in range(64) if i not in written]
    assert torch.equal(method.queue[untouched], queue[untouched])
    assert method.queue_ptr.item() == (start + BATCH) % 64


def test_moco_eval_forward_changes_no_state():
    method = build_moco().method
    perturb_(method, KEY)
    method.queue_ptr.fill_(5)
    state = copy.deepcopy(method.state_dict())
    method.eval()(Batch.of(moco_views()))
    assert_params_equal(method.state_dict(), state)


def test_moco_v1_is_moco_with_a_linear_projection_temperature_007_and_v1_views():
    """``main_moco.py`` without ``--mlp --aug-plus --cos``: fc 512 -> 128 with bias (``head_q.0``), τ = 0.07."""
    method = build("moco_v1_resnet18", image_size=32, queue_size=64).method.train()
    for head in (method.head_q, method.head_k):
        assert [type(m) for m in head] == [nn.Linear]
        assert (head[0].in_features, head[0].out_features, head[0].bias is not None) == (512, 128, True)
    perturb_(method, KEY)
    queue = method.queue.clone()
    loss = method(Batch.of(moco_views())).loss
    query, key = moco_embeddings(method, moco_views())
    torch.testing.assert_close(loss, info_nce_with_queue(query, key, queue, 0.07))
    view = method.view_recipe().transforms[0]
    assert [type(t) for t in view.transforms[:4]] == [
        v2.RandomResizedCrop, v2.RandomGrayscale, v2.ColorJitter, v2.RandomHorizontalFlip
    ]  # fmt: skip


# ---- released encoder -----------------------------------------------------------------------------------------------
def test_released_encoder_is_the_query_encoder():
    model = build_moco()
    perturb_(model.method, ("encoder_k.",))
    assert_released_is(model, model.method.encoder_q, model.method.encoder_k)


# ---- one optimisation step ------------------------------------------------------------------------------------------
def test_moco_one_sgd_step_lowers_loss_against_the_same_keys_and_queue():
    method = build_moco().method.train()
    batch = Batch.of(moco_views())
    key_state = {n: v.clone() for n, v in method.state_dict().items() if not n.startswith(QUERY)}

    def measure():
        probe = copy.deepcopy(method)
        probe.load_state_dict(key_state, strict=False)
        with torch.no_grad():
            return probe(batch).loss.item()

    optimizer = torch.optim.SGD(method.param_groups(), lr=1e-3)
    before = measure()
    optimizer.zero_grad()
    method(batch).loss.backward()
    optimizer.step()
    after = measure()
    assert after < 0.99 * before, (before, after)
