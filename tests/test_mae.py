"""MAE (arXiv 2111.06377; facebookresearch/mae) built through ``sslhub.create_model(preset, task="pretraining")``.

Each test checks one rule of the paper / official code against numbers computed here: the forward pass against
``models_mae.py`` written out (masking noise given through ``batch.extras["noise"]``), the fixed sin-cos position
embeddings, the released encoder, and that one optimisation step lowers the loss on a fixed batch. The loss equation
itself is checked in test_losses.py; here it is only given the tensors the method should feed it.
"""

import pytest
import torch
from helpers import assert_params_equal, build, perturb_

from sslhub.batch import Batch
from sslhub.losses import masked_patch_mse
from sslhub.masking import patchify, sincos_2d_position_embedding

BATCH = 4
SHALLOW = {"depth": 2}  # 2 of ViT-Tiny's 12 blocks: same code paths, a sixth of the time


pytestmark = pytest.mark.usefixtures("single_thread")


def build_mae(**overrides):
    return build("mae_vit_tiny_patch4_32px", backbone_kwargs=SHALLOW, **overrides)


def images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference_mae_prediction(method, pixels, noise, mask_ratio):
    """models_mae.py written out with the timm ViT parts: keep the lowest-noise patches, encode them after the class
    token, put the decoded tokens back at their positions with mask tokens elsewhere, decode. Returns (pred, mask)."""
    enc, dec = method.encoder.backbone, method.decoder
    batch, length = noise.shape
    kept = noise.argsort(dim=1)[:, : int(length * (1 - mask_ratio))]
    tokens = enc.patch_embed(pixels) + enc.pos_embed[:, 1:]
    visible = torch.stack([tokens[b, kept[b]] for b in range(batch)])
    cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(batch, -1, -1)
    x = enc.norm_pre(torch.cat([cls, visible], dim=1))
    for block in enc.blocks:
        x = block(x)
    x = dec.decoder_embed(enc.norm(x))
    full = dec.mask_token.expand(batch, length, -1).clone()
    mask = torch.ones(batch, length)
    for b in range(batch):
        full[b, kept[b]] = x[b, 1:]
        mask[b, kept[b]] = 0
    y = torch.cat([x[:, :1], full], dim=1) + dec.decoder_pos_embed
    for block in dec.decoder_blocks:
        y = block(y)
    return dec.decoder_pred(dec.decoder_norm(y))[:, 1:], mask


@pytest.mark.parametrize(("mask_ratio", "norm_pix_loss"), [(0.75, True), (0.5, False)])
def test_mae_forward_matches_reference(mask_ratio, norm_pix_loss):
    model = build_mae(mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss)
    perturb_(model.method, ("encoder.", "decoder."))  # e.g. the class token's (zero) position embedding counts too
    pixels, noise = images(2, 3, 32, 32), torch.rand(2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_prediction, expected_mask = reference_mae_prediction(model.method, pixels, noise, mask_ratio)
        tokens, mask, ids_restore = model.method.encode_visible(pixels, noise)
        prediction = model.method.decoder(tokens, ids_restore)
    assert prediction.shape == (2, 64, 4 * 4 * 3)
    torch.testing.assert_close(mask, expected_mask)
    torch.testing.assert_close(prediction, expected_prediction)
    expected_loss = masked_patch_mse(expected_prediction, patchify(pixels, 4), expected_mask, norm_pix_loss)
    torch.testing.assert_close(model([pixels], noise=noise).loss, expected_loss)
    torch.testing.assert_close(model.method(Batch.of([pixels], noise=noise)).loss, expected_loss)


def test_mae_position_embeddings_are_fixed_sincos():
    method = build_mae().method
    trainable = {id(p) for group in method.param_groups() for p in group["params"]}
    for pos_embed, dim in ((method.encoder.backbone.pos_embed, 192), (method.decoder.decoder_pos_embed, 128)):
        torch.testing.assert_close(pos_embed[0], sincos_2d_position_embedding(dim, (8, 8), cls_token=True))
        assert not pos_embed.requires_grad and id(pos_embed) not in trainable


def test_released_encoder_is_the_encoder_without_the_decoder():
    model = build_mae()
    perturb_(model.method, ("encoder.",))
    assert model.method.released_encoder is model.method.encoder
    released = model.released_model().encoder.state_dict()
    assert_params_equal(released, model.method.encoder.state_dict())
    assert not any(name.startswith(("decoder", "mask_token")) for name in released)


def test_mae_one_adamw_step_lowers_loss_with_the_same_mask():
    method = build_mae().method
    noise = torch.rand(BATCH, 64, generator=torch.Generator().manual_seed(1))
    batch = Batch.of([images(BATCH, 3, 32, 32)], noise=noise)

    def measure():
        with torch.no_grad():
            return method(batch).loss.item()

    optimizer = torch.optim.AdamW(method.param_groups(), lr=1e-4, betas=(0.9, 0.95))
    before = measure()
    method.train()
    optimizer.zero_grad()
    method(batch).loss.backward()
    optimizer.step()
    after = measure()
    assert after < 0.99 * before, (before, after)
