"""BEiT: masked image modelling by predicting the visual tokens of a frozen tokenizer.

Bao, Dong, Piao & Wei, "BEiT: BERT Pre-Training of Image Transformers", arXiv 2106.08254 (ICLR 2022). Follows
microsoft/unilm ``beit/`` (``run_beit_pretraining.py``, ``engine_for_pretraining.py``, ``modeling_pretrain.py``,
``modeling_finetune.py``, ``masking_generator.py``, ``datasets.py`` ``DataAugmentationForBEiT``, ``transforms.py``,
``modeling_discrete_vae.py``, ``run_linear_eval.py``, README) and openai/DALL-E for the tokenizer
(``sslhub.tokenizers``).

- Two views of one crop (``DataAugmentationForBEiT``): colour jitter (0.4, 0.4, 0.4, no hue, always), horizontal flip,
  then one random resized crop (scale (0.08, 1), ratio (3/4, 4/3); ``RandomResizedCropAndInterpolationWithTwoPic``)
  resized twice: to 224 px bicubic for the ViT (normalised: mean / std 0.5, ``IMAGENET_INCEPTION_*``, for
  ImageNet-22k; ImageNet's with ``--imagenet_default_mean_and_std`` for ImageNet-1k) and to 112 px Lanczos for the
  tokenizer (``ToTensor`` then DALL-E's ``map_pixels``, x (1 - 2ε) + ε, ε = 0.1).
- Tokens: the frozen DALL-E dVAE encoder turns the 112 px view into a 14 x 14 grid of tokens z_i (argmax of its 8192
  logits), one per 16 px patch (``sslhub.tokenizers.DalleEncoder``).
- Masking (§2.5, Algorithm 1, ``MaskingGenerator``): blocks of at least 16 patches with aspect ratio log-uniform in
  [0.3, 1/0.3] until 75 of the 196 patches (~40 %) are masked (``sslhub.masking.BlockMaskingGenerator``).
- Encoder (``VisionTransformerForMaskedImageModeling``): timm's ``Beit`` with no absolute position embedding, one
  relative position bias shared by the blocks, layer scale 0.1, ``q_bias`` / ``v_bias``, LayerNorm eps 1e-6; masked
  patch embeddings are replaced by a learnable ``mask_token`` (x (1 - w) + m w) before the class token is prepended.
- Loss (eq. 1 / §2.3): max Σ_{i ∈ M} log p(z_i | x^M), p = softmax(lm_head(h_i)) with ``lm_head = Linear(D, 8192)`` on
  the final-norm token h_i of each masked patch: the cross-entropy over the masked positions only.
- Recipe (``run_beit_pretraining.py`` with the README's ImageNet-1k command, the paper's Table): AdamW β (0.9, 0.999),
  eps 1e-8, lr 1.5e-3 for a batch of 2048 (the script takes an absolute lr; here it is scaled linearly with the
  batch), weight decay 0.05 except 1-d parameters, biases and the class token (``get_parameter_groups`` with
  ``no_weight_decay``: the mask token and the position table are decayed), 10 warm-up epochs (per step, from 0) then
  cosine to 1e-5, gradient norm clipped at 3, drop path 0.1, 800 epochs. The ``beit_base_patch16_224`` preset follows
  the README's ImageNet-22k command instead, the one its release comes from: 150 epochs, 10 000 warm-up steps
  (``IN22K_WARMUP_EPOCHS``), mean / std 0.5.
- Initialisation (``VisionTransformerForMaskedImageModeling.__init__``): class token, mask token, every linear and
  convolution weight trunc-normal with std 0.02 cut at ±0.02 (the authors' ``trunc_normal_(a=-std, b=std)``), zero
  biases, then attention / MLP output projections divided by sqrt(2 layer) (``fix_init_weight``).

The tokenizer is a frozen auxiliary network: ``tokenizer_path`` names its weights, DALL-E's ``encoder.pkl``
(https://cdn.openai.com/dall-e/encoder.pkl, read without running its code) or a safetensors file of sslhub's
``DalleEncoder``; without one a new pretraining model refuses to build. ``tokenizer_path="random"`` keeps the random
initialisation: a BEiT with a random tokenizer, a baseline of its own (the tokens are then a fixed random hash of
local pixel statistics; random-target MIM baselines are reported in later MIM work, no citation verified here).

Features. ``last_hidden_state`` is every token after the final norm; ``pooler_output`` the mean of the final-norm
patch tokens (``default_pooling = "mean"``, as the authors' fine-tuning averages the patch tokens, there with a new
LayerNorm). The authors' linear probe (``run_linear_eval.py``, README "linear probe" example) is another feature: a
linear classifier on the concatenated [class token; mean of the patch tokens] of every block's output (before the
final norm), one per block, the best block reported; the paper reports the probe on an intermediate block (which one
could not be verified here). ``linear_recipe`` below is that script's optimiser on sslhub's pooled feature.

Deviations: the per-step lr is scaled linearly with the batch (the script takes it as given); ``train_interpolation
="random"`` is not offered; the tokenizer runs in the trainer's precision (DALL-E's convolutions use float16 on CUDA);
the encoder has no absolute position embedding (the ImageNet-22k recipe; the masked forward is SimMIM's, which adds
none). The released file's ``epochs`` are not stated next to it in the README (its ImageNet-22k command says 150).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import nn
from torchvision import transforms as transforms_v1
from torchvision.transforms import v2

from sslhub.batch import Batch
from sslhub.conversion.hf_transformers import beit_from_transformers, beit_mim_head_from_transformers, left_out_entries
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries, prefixed
from sslhub.conversion.loading import CheckpointError
from sslhub.masking import BlockMaskingGenerator
from sslhub.methods.base import ExportTargets, MethodHparams, MethodOutput, SSLMethod, hparam
from sslhub.methods.simmim import SIMMIM_VIT, SimMIM, _relative_position_check
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.tokenizers import DALLE_ENCODER_URL, DalleEncoder, MapPixels, load_tokenizer_state
from sslhub.transforms import ViewRecipe, Views, color_jitter, flip, normalize

# timm Beit arguments of run_beit_pretraining.py's defaults (--rel_pos_bias shared, no --abs_pos_emb,
# --layer_scale_init_value 0.1): the same BEiT-style ViT as SimMIM's release.
BEIT_VIT = SIMMIM_VIT
RANDOM_TOKENIZER = "random"
# The README's ImageNet-22k command warms up for 10 000 steps of 2048 images: epochs of ImageNet-22k's 14,197,122
# images (6932 steps each, drop_last).
IN22K_WARMUP_EPOCHS = 10_000 / (14_197_122 // 2048)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass
class BEiTHparams(MethodHparams):
    """``run_beit_pretraining.py`` with the README's ImageNet-1k pretraining command (module docstring)."""

    optimizer: str = "adamw"
    lr: float = 1.5e-3
    lr_batch_size: int = 2048
    min_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05
    warmup_epochs: float = 10
    clip_grad: float | None = 3.0
    epochs: int = 800
    tokenizer_path: str | None = hparam(
        None,
        f"the frozen tokenizer's weights: DALL-E's encoder.pkl ({DALLE_ENCODER_URL}) or a safetensors file of sslhub's "
        f"DalleEncoder; {RANDOM_TOKENIZER!r} keeps a random one (a baseline); required for a new pretraining model",
    )
    vocab_size: int = hparam(8192, "visual tokens of the tokenizer, the classes of lm_head")
    tokenizer_hidden: int = hparam(256, "width n_hid of the tokenizer's first group (DALL-E: 256)")
    tokenizer_blocks_per_group: int = hparam(2, "residual blocks per group of the tokenizer (DALL-E: 2)")
    tokenizer_groups: int = hparam(4, "groups of the tokenizer, 2^(groups-1) px per token (DALL-E: 4, 8 px)")
    second_input_size: int = hparam(112, "side of the tokenizer's view (--second_input_size)")
    train_interpolation: str = hparam("bicubic", "resizing of the ViT's view (--train_interpolation)")
    second_interpolation: str = hparam("lanczos", "resizing of the tokenizer's view (--second_interpolation)")
    crop_scale_min: float = hparam(0.08, "smallest area fraction of the random resized crop")
    color_jitter: float = hparam(0.4, "brightness, contrast and saturation jitter (no hue), always applied")
    num_mask_patches: int = hparam(75, "patches masked per image (--num_mask_patches; 75 of 196 is ~40 %)")
    min_mask_patches_per_block: int = hparam(16, "smallest block of the block-wise masking (Algorithm 1)")
    max_mask_patches_per_block: int | None = hparam(None, "largest block (None: num_mask_patches)")
    drop_path_rate: float = hparam(0.1, "stochastic depth of the encoder (--drop_path)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.min_mask_patches_per_block <= self.num_mask_patches:
            raise ValueError(
                f"min_mask_patches_per_block ({self.min_mask_patches_per_block}) must be in [1, num_mask_patches "
                f"({self.num_mask_patches})]"
            )


class TwoSizeCrop:
    """``RandomResizedCropAndInterpolationWithTwoPic``: one random resized crop of a PIL image (``scale``, aspect
    ratio 3/4 to 4/3, torchvision's parameter draw) resized to ``size`` with ``interpolation`` and to ``second_size``
    with ``second_interpolation``; returns both images."""

    def __init__(
        self, size: int, second_size: int, scale: tuple[float, float], interpolation: str, second_interpolation: str
    ):
        self.sizes = ([size, size], [second_size, second_size])
        self.scale, self.ratio = tuple(scale), (3 / 4, 4 / 3)
        self.interpolations = (v2.InterpolationMode(interpolation), v2.InterpolationMode(second_interpolation))

    def __call__(self, image):
        top, left, height, width = transforms_v1.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        return tuple(
            v2.functional.resized_crop(image, top, left, height, width, size, interpolation)
            for size, interpolation in zip(self.sizes, self.interpolations, strict=True)
        )

    def __repr__(self) -> str:
        modes = "/".join(mode.value for mode in self.interpolations)
        return f"{type(self).__name__}(sizes={self.sizes[0][0]}/{self.sizes[1][0]}, scale={self.scale}, {modes})"


class BEiTViews(ViewRecipe):
    """``DataAugmentationForBEiT``: the ViT's view, the tokenizer's view of the same crop and a block mask
    (``extras["mask"]``, (h, w) bool, True = masked)."""

    def __init__(self, common, crop: TwoSizeCrop, patch_input, token_input, masks):
        self.common, self.crop, self.patch_input, self.token_input, self.masks = (
            common,
            crop,
            patch_input,
            token_input,
            masks,
        )

    def make_views(self, image) -> Views:
        for_patches, for_tokens = self.crop(self.common(image))
        return Views([self.patch_input(for_patches), self.token_input(for_tokens)], {"mask": self.masks()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.common}, {self.crop})"


def convert_beit(container, source: str) -> Converted:
    """microsoft/unilm beit ``utils.save_model``: ``{'model', ['optimizer', 'epoch', 'scaler', 'args']}`` (the
    released ``beit_*_pt22k.pth``: ``{'model'}``); ``model`` = ``VisionTransformerForMaskedImageModeling``: timm
    ``Beit`` names (``q_bias`` / ``v_bias``, ``gamma_1`` / ``gamma_2``, the shared ``rel_pos_bias``), plus
    ``mask_token`` and ``lm_head``. The vocabulary size is the file's ``lm_head``'s."""
    reader = KeyReader(entry(container, "model", source), source)
    mask_token = reader.take_one("mask_token")
    lm_head = reader.take("lm_head.")
    encoder = reader.take("")
    reader.finish()
    if "weight" not in lm_head:
        raise CheckpointError(f"{source}: key 'lm_head.weight' is missing")
    left_out = _relative_position_check(encoder, source, file_prefix="") + leftover_entries(container, {"model"})
    method = {"mask_token": mask_token, **prefixed("lm_head.", lm_head)}
    overrides = {"vocab_size": lm_head["weight"].shape[0]}
    return Converted("beit", encoder, method, {"encoder.backbone.": encoder}, overrides, left_out)


def _is_beit(container) -> bool:
    model = container.get("model") if isinstance(container, dict) else None
    return isinstance(model, dict) and {"mask_token", "lm_head.weight", "cls_token"} <= set(model)


def convert_transformers_beit(container, source: str) -> Converted:
    """A transformers ``BeitForMaskedImageModeling`` directory (``microsoft/beit-base-patch16-224-pt22k``): the
    encoder in timm names, ``mask_token`` and ``lm_head`` as BEiT's, the config's ``vocab_size``; or a ``BeitModel``
    with the shared bias (what ``sslhub export`` writes for the encoder): the encoder alone."""
    state_dict, config = container["state_dict"], container["config"]
    try:
        backbone, ignored = beit_from_transformers(state_dict, config)
        head = beit_mim_head_from_transformers(state_dict, config) if "lm_head.weight" in state_dict else None
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from err
    if head is None:
        return Converted("transformers_beit", backbone, left_out=left_out_entries(ignored))
    left_out = left_out_entries(
        {key: rule for key, rule in ignored.items() if not rule.startswith(("mask_token", "lm_head"))}
    )
    overrides = {"vocab_size": head["lm_head.weight"].shape[0]}
    return Converted("transformers_beit", backbone, head, {"encoder.backbone.": backbone}, overrides, left_out)


def _is_transformers_beit(container) -> bool:
    """Every transformers BEiT: one of pretraining (a shared relative position bias) converts, a fine-tuned one (a
    bias per block) is refused by ``beit_from_transformers`` with the reason."""
    return True


@register_method("beit")
class BEiT(SSLMethod):
    """The encoder sees every patch, the masked ones as ``mask_token``; ``lm_head`` predicts the frozen tokenizer's
    visual token of each masked patch; cross-entropy on the masked positions. Released: the encoder (without mask
    token and ``lm_head``)."""

    Hparams = BEiTHparams
    paper = "BEiT: BERT Pre-Training of Image Transformers"
    arxiv = "2106.08254"
    citation = (
        "@inproceedings{bao2022beit,\n  title={{BEiT}: {BERT} Pre-Training of Image Transformers},\n  author={Bao, "
        "Hangbo and Dong, Li and Piao, Songhao and Wei, Furu},\n  booktitle={ICLR},\n  year={2022}\n}"
    )
    released = (
        "encoder (BEiT ViT without the mask token and lm_head). pooler_output: the mean of the final-norm patch "
        "tokens; the authors' linear probe (run_linear_eval.py) instead trains on [class token; mean of the patch "
        "tokens] of each block's output before the final norm and reports the best block"
    )
    default_pooling = "mean"
    no_weight_decay = ("encoder.backbone.cls_token",)  # VisionTransformerForMaskedImageModeling.no_weight_decay
    # run_linear_eval.py: AdamW (weight decay 1e-4), lr 4e-3 at 8 x 128 images (README), cosine, 100 epochs
    linear_recipe = LinearRecipe(
        "microsoft/unilm beit run_linear_eval.py (AdamW; on the pooled feature, not every block's output)",
        0.001,
        100,
        1024,
        optimizer="adamw",
        weight_decay=1e-4,
    )
    checkpoint_layouts = (
        CheckpointLayout("beit", _is_beit, convert_beit),
        CheckpointLayout("transformers_beit", _is_transformers_beit, convert_transformers_beit, ("beit",)),
    )
    export_targets = ExportTargets(encoder="BeitModel", pretraining="BeitForMaskedImageModeling")
    tiny_preset = "beit_vit_tiny_patch4_32px"
    tiny_overrides = {
        "backbone_kwargs": {**BEIT_VIT, "img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
        "tokenizer_path": RANDOM_TOKENIZER,
        "tokenizer_hidden": 8,
        "vocab_size": 32,
    }

    encode_masked = SimMIM.encode_masked  # VisionTransformerForMaskedImageModeling.forward_features (patch map)

    def __init__(self, config):
        super().__init__(config)
        hp = self.hparams
        self.encoder = self.build_encoder(config, drop_path_rate=hp.drop_path_rate)
        vit = self.encoder.backbone
        if not isinstance(vit, Beit) or vit.pos_embed is not None:
            raise ValueError(
                f"BEiT's encoder is timm's Beit without absolute position embedding (use_abs_pos_emb=False), got "
                f"{config.backbone!r} with {config.backbone_kwargs}"
            )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))
        self.lm_head = nn.Linear(vit.num_features, hp.vocab_size)
        self._init_like_beit()
        self.tokenizer = DalleEncoder(
            hp.tokenizer_hidden, hp.tokenizer_blocks_per_group, hp.vocab_size, hp.tokenizer_groups
        ).requires_grad_(False)
        grid = vit.patch_embed.grid_size
        if hp.second_input_size != grid[0] * self.tokenizer.downsampling or grid[0] != grid[1]:
            raise ValueError(
                f"the tokenizer makes one token per {self.tokenizer.downsampling} px of its {hp.second_input_size} px "
                f"view, the ViT has a {grid[0]}x{grid[1]} grid of patches: set second_input_size="
                f"{grid[0] * self.tokenizer.downsampling} (or tokenizer_groups) so that there is one token per patch"
            )
        if hp.num_mask_patches >= grid[0] * grid[1]:
            raise ValueError(f"num_mask_patches ({hp.num_mask_patches}) must be below the {grid[0] * grid[1]} patches")
        self.block_masks = BlockMaskingGenerator(grid, hp.max_mask_patches_per_block, hp.min_mask_patches_per_block)

    def _init_like_beit(self) -> None:
        """``VisionTransformerForMaskedImageModeling``'s initialisation (module docstring)."""
        vit, std = self.encoder.backbone, 0.02
        for module in [*vit.modules(), self.lm_head]:
            if isinstance(module, nn.Linear | nn.Conv2d):
                trunc_normal_(module.weight, std=std, a=-std, b=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for token in (vit.cls_token, self.mask_token):
            trunc_normal_(token, std=std, a=-std, b=std)
        vit.fix_init_weight()

    def auxiliary_networks(self):
        return {"tokenizer": self.tokenizer}

    def load_auxiliary_weights(self) -> None:
        """The tokenizer's weights from ``tokenizer_path`` (module docstring); a clear error without one."""
        path = self.hparams.tokenizer_path
        if path is None:
            raise CheckpointError(
                "BEiT predicts the tokens of a frozen tokenizer and none was given: set tokenizer_path to DALL-E's "
                f"dVAE encoder, encoder.pkl from {DALLE_ENCODER_URL} (or a safetensors file of sslhub's "
                f"DalleEncoder; tokenizer_path={RANDOM_TOKENIZER!r} for a random tokenizer)"
            )
        if path == RANDOM_TOKENIZER:
            return
        from sslhub.conversion.convert import load_strict  # convert imports the model classes, which import methods

        hp = self.hparams
        what = (
            f"tokenizer {path} (built with tokenizer_hidden={hp.tokenizer_hidden}, tokenizer_blocks_per_group="
            f"{hp.tokenizer_blocks_per_group}, tokenizer_groups={hp.tokenizer_groups}, vocab_size={hp.vocab_size})"
        )
        load_strict(self.tokenizer, load_tokenizer_state(path), what)

    def view_recipe(self):
        cfg, hp = self.config, self.hparams
        jitter = color_jitter(hp.color_jitter, hp.color_jitter, hp.color_jitter, 0.0, p=1.0)
        crop = TwoSizeCrop(
            cfg.image_size,
            hp.second_input_size,
            (hp.crop_scale_min, 1.0),
            hp.train_interpolation,
            hp.second_interpolation,
        )
        token_input = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), MapPixels(), v2.ToPureTensor()])
        return BEiTViews(
            v2.Compose([jitter, flip()]),
            crop,
            v2.Compose(normalize(cfg.image_mean, cfg.image_std)),
            token_input,
            self.draw_mask,
        )

    def draw_mask(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One block mask (h, w), True = masked (``MaskingGenerator()``)."""
        return self.block_masks(self.hparams.num_mask_patches, generator)

    def mim_logits(self, images: torch.Tensor, mask: torch.Tensor, all_tokens: bool = False) -> torch.Tensor:
        """``VisionTransformerForMaskedImageModeling.forward``: ``lm_head`` on the final-norm patch tokens of the
        masked patches (M, vocab), in row-major order image by image, or of every patch (B, L, vocab)."""
        patches = self.encode_masked(images, mask).flatten(2).transpose(1, 2)
        return self.lm_head(patches if all_tokens else patches[mask.flatten(1)])

    def forward(self, batch: Batch) -> MethodOutput:
        """``batch.views``: the ViT's images and the tokenizer's; ``batch.extras["mask"]`` (B, h, w), True = masked:
        drawn by ``draw_mask`` when absent."""
        if len(batch.views) != 2:
            raise ValueError(f"BEiT takes two views (the ViT's images, the tokenizer's), got {len(batch.views)}")
        images, token_images = batch.views
        mask = batch.extras.get("mask")
        if mask is None:
            mask = torch.stack([self.draw_mask() for _ in range(images.shape[0])])
        mask = mask.to(images.device, torch.bool)
        labels = self.tokenizer.tokens(token_images)[mask.flatten(1)]
        return MethodOutput(F.cross_entropy(self.mim_logits(images, mask), labels))


register_preset(
    Preset(
        "beit_base_patch16_224",
        "beit",
        "beit_base_patch16_224",
        backbone_kwargs=dict(BEIT_VIT),
        method_kwargs={"epochs": 150, "warmup_epochs": IN22K_WARMUP_EPOCHS},
        image_mean=INCEPTION_MEAN,
        image_std=INCEPTION_STD,
        description="BEiT-base (shared relative position bias, layer scale 0.1) predicting DALL-E's 8192 visual "
        "tokens of 75 block-masked patches; the README's ImageNet-22k recipe: AdamW lr 1.5e-3 per 2048, 150 "
        "epochs, 10k warm-up steps, mean / std 0.5 (set tokenizer_path to DALL-E's encoder.pkl)",
    )
)

register_preset(
    Preset(
        "beit_vit_tiny_patch4_32px",
        "beit",
        "beit_base_patch16_224",
        image_size=32,
        backbone_kwargs={**BEIT_VIT, "img_size": 32, "patch_size": 4, "embed_dim": 192, "num_heads": 3},
        method_kwargs={
            "second_input_size": 16,
            "tokenizer_groups": 2,
            "tokenizer_hidden": 32,
            "vocab_size": 512,
            "num_mask_patches": 25,
            "min_mask_patches_per_block": 5,
            "warmup_epochs": 2,
        },
        image_mean=INCEPTION_MEAN,
        image_std=INCEPTION_STD,
        description="BEiT, BEiT-style ViT-Tiny (192 wide, 12 blocks) with 4 px patches for 32 px images: the "
        "tokenizer sees the crop at 16 px (as 112 / 224) with 2 groups (2 px per token: one token per patch), "
        "32 wide, 512 tokens; 25 of the 64 patches masked (~40 %, as 75 / 196) in blocks of at least 5 (16 / 196)",
    )
)

# microsoft/unilm beit README: "BEiT-base", self-supervised pretrained on ImageNet-22k at 224 px, fine-tuned on
# ImageNet-1k at 224: top-1 83.7. The file holds the whole pretraining model but the tokenizer (DALL-E's).
_PT22K = "https://github.com/addf400/files/releases/download/v1.0/beit_base_patch16_224_pt22k.pth"
register_pretrained(
    PretrainedTag(
        "beit_base_patch16_224",
        "pt22k",
        url=_PT22K,
        full_url=_PT22K,
        layout="beit",
        license="mit",
        epochs=None,
        metrics={"finetune": 83.7},
        pretraining_data="imagenet-22k",
        source="microsoft/unilm beit README (BEiT-base pt22k, fine-tuned on ImageNet-1k at 224 px: top-1 83.7)",
    )
)
