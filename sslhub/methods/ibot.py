"""iBOT: masked image modelling with the teacher as online tokenizer.

Zhou, Wei, Wang, Shen, Xie, Yuille & Kong, "iBOT: Image BERT Pre-Training with Online Tokenizer", arXiv 2111.07832
(ICLR 2022). Follows bytedance/ibot (``main_ibot.py``: ``iBOTLoss``, ``DataAugmentationiBOT``, ``train_one_epoch``;
``models/vision_transformer.py``: ``masked_embed``, ``prepare_tokens`` / ``mask_model``; ``models/head.py``:
``iBOTHead``; ``loader.py``: ``ImageFolderMask``; ``extract_backbone_weights.py``; ``utils.py``) and the README's
ViT-S/16 command. iBOT is DINO (``sslhub.methods.dino``) plus self-distillation on masked patch tokens:

- Views (``DataAugmentationiBOT`` is DINO's ``DataAugmentationDINO``): 2 global crops (224 px, scale (0.25, 1)) and
  10 local crops (96 px, scale (0.05, 0.25)).
- Masks (``ImageFolderMask``), one per global crop of each image: a prediction ratio r is drawn for each
  (``pred_ratio``, ``pred_ratio_var``) pair, uniform in [m - v, m + v] (m when v = 0), and one of them is chosen
  uniformly; the release's ``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2`` leaves half of the crops unmasked and masks
  the others with r ~ U[0.1, 0.5]. Then r·L of the L patches are masked block-wise (``pred_shape='block'``, BEiT's
  algorithm: rectangles of at least (min(h, w) // 3)² patches, aspect ratio log-uniform in [0.3, 1/0.3]) or at random
  (``'rand'``: int(r·L) patches).
- Encoder: timm's ``VisionTransformer`` (the authors' ViT: qkv bias, LayerNorm eps 1e-6, learned position embedding
  with a class-token slot, no layer scale). In the student the patch embeddings of the masked patches are replaced by
  a learnable ``masked_embed`` (1, D), zero-initialised, before the class token and the position embedding are added
  (``prepare_tokens``); local crops are not masked. The teacher (EMA of the student, without ``masked_embed``) sees
  the global crops unmasked.
- Head (``iBOTHead``): DINO's head (3-layer MLP D -> 2048 -> 2048 -> 256 with GELU, l2-normalised bottleneck,
  weight-normed last layer of 8192 prototypes) for the class token; patch tokens pass the same MLP and
  ``last_layer2``: with ``shared_head`` the same module as ``last_layer`` (iBOT registers it under both names, so
  its state dicts list it twice; sslhub holds it once, as ``last_layer``), else its own ``patch_out_dim``
  prototypes. The teacher's head is shared (``shared_head_teacher``).
- Loss (``iBOTLoss``, §3.3): ``L = λ1 L_[CLS] + λ2 L_MIM``. ``L_[CLS]``: DINO's eq. 3, the mean over (teacher global
  crop t, student crop s ≠ t) of ``-Σ_k P_t[k] log P_s[k]`` with ``P_t = softmax((g_t - c) / τ_t)``, ``P_s =
  softmax(g_s / τ_s)`` (the student's global class tokens from the masked crops). ``L_MIM``: for each global crop,
  ``1/|M| Σ_{i ∈ M} -Σ_k P'_t[i, k] log P'_s[i, k]`` over its masked patches M (teacher on the unmasked crop,
  ``P'_t = softmax((g'_t - c') / τ'_t)``), averaged over all images (unmasked ones count 0) and both crops. Centres:
  ``c ← 0.9 c + 0.1 mean(g_t)``, ``c' ← 0.9 c' + 0.1 mean over images and patches of g'_t``.
- Schedules and optimisation (``main_ibot.py`` defaults and the ViT-S/16 command): τ_t 0.04 -> 0.07 and τ'_t
  0.04 -> 0.07 linearly over 30 epochs (τ'_t after ``pred_start_epoch``, before which nothing is masked), τ_s 0.1;
  teacher momentum 0.996 -> 1 (cosine); AdamW, lr 5e-4 per 256 images with 10 warm-up epochs, cosine to 1e-6; weight
  decay 0.04 -> 0.4 (cosine) on every parameter but biases and 1-d ones (``masked_embed`` is decayed); per-parameter
  gradient clipping at 3.0 (``masked_embed`` included); the student's last layer(s) frozen during the first epoch;
  student drop path 0.1; 800 epochs.

Released encoder: the teacher backbone (``checkpoint_teacher.pth``). Deviations: position embeddings of the local
crops are resampled by timm (bicubic, antialiased) rather than iBOT's ``interpolate_pos_encoding`` (bicubic with a
0.1 offset); the masks come from the view recipe per image, drawn with torch's generator rather than Python's
``random``; the student's head is applied to the class tokens and the masked patch tokens only (the official code
applies it to every token and masks the loss: the same loss and gradients); norms in the head (``--norm_in_head``) are
not offered. Not verified: the exact arguments of the ViT-B/16 run (its ``args.txt`` was not readable here:
``norm_last_layer=True`` follows the ``--norm_last_layer`` help text, "True with vit_base"; 400 epochs follows the
paper's 1600 effective epochs; the crop settings are the ViT-S/16 command's); whether the released
``checkpoint_teacher.pth`` files hold the head (``extract_backbone_weights.py --with_head``): both are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslhub.backbones import forward_by_resolution, is_vision_transformer
from sslhub.batch import Batch
from sslhub.conversion.keys import CheckpointLayout, Converted, KeyReader, entry, leftover_entries, prefixed
from sslhub.conversion.loading import CheckpointError
from sslhub.distributed import mean_over_processes
from sslhub.heads import DINOHead, WeightNormLinear
from sslhub.losses import dino_cross_entropy, ibot_patch_cross_entropy
from sslhub.masking import BlockMaskingGenerator
from sslhub.methods.base import MethodOutput, TrainingProgress, hparam
from sslhub.methods.dino import DINO, DINOHparams, _dino_head_sizes, dino_views, warmup_then_constant
from sslhub.methods.dinov2 import masked_forward_features
from sslhub.probes import LinearRecipe
from sslhub.registry import Preset, PretrainedTag, register_method, register_preset, register_pretrained
from sslhub.transforms import ViewRecipe, Views

PRED_SHAPES = ("block", "rand")
PRED_ASPECT_RATIO = 0.3  # ``main_ibot.py``: ImageFolderMask(pred_aspect_ratio=(0.3, 1/0.3))


@dataclass
class IBOTHparams(DINOHparams):
    """``main_ibot.py`` arguments (same names) as the README's ViT-S/16 command sets them: ``--teacher_temp 0.07
    --warmup_teacher_temp_epochs 30 --norm_last_layer false --epochs 800 --shared_head true --out_dim 8192
    --local_crops_number 10 --global_crops_scale 0.25 1 --local_crops_scale 0.05 0.25 --pred_ratio 0 0.3
    --pred_ratio_var 0 0.2``; the rest are ``main_ibot.py``'s defaults (DINO's: AdamW lr 5e-4 per 256, min lr 1e-6,
    10 warm-up epochs, weight decay 0.04 -> 0.4, clipping 3.0, momentum 0.996, drop path 0.1)."""

    epochs: int = 800
    out_dim: int = 8192
    norm_last_layer: bool = False
    teacher_temp: float = 0.07
    global_crops_scale: tuple[float, float] = (0.25, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.25)
    local_crops_number: int = 10
    patch_out_dim: int = hparam(8192, "prototypes of a separate patch last layer (--patch_out_dim)")
    shared_head: bool = hparam(True, "the student's patch tokens use the class token's last layer (--shared_head)")
    shared_head_teacher: bool = hparam(True, "the same for the teacher (--shared_head_teacher)")
    warmup_teacher_patch_temp: float = hparam(0.04, "initial teacher temperature τ'_t of the patch tokens")
    teacher_patch_temp: float = hparam(0.07, "patch teacher temperature after the warm-up (--teacher_patch_temp)")
    patch_center_momentum: float = hparam(0.9, "momentum of the patch center c' (iBOTLoss center_momentum2)")
    lambda1: float = hparam(1.0, "weight of the class-token loss (--lambda1)")
    lambda2: float = hparam(1.0, "weight of the masked-patch loss (--lambda2)")
    pred_ratio: tuple[float, ...] = hparam((0.0, 0.3), "prediction ratios m, one chosen per crop (--pred_ratio)")
    pred_ratio_var: tuple[float, ...] = hparam((0.0, 0.2), "ratio drawn in [m - v, m + v] (--pred_ratio_var)")
    pred_shape: str = hparam("block", "'block' (BEiT's block-wise masking) or 'rand' masks (--pred_shape)")
    pred_start_epoch: int = hparam(0, "epoch from which the global crops are masked (--pred_start_epoch)")

    def __post_init__(self):
        super().__post_init__()
        if self.pred_shape not in PRED_SHAPES:
            raise ValueError(f"pred_shape {self.pred_shape!r}: expected one of {PRED_SHAPES}")
        if len(self.pred_ratio) != len(self.pred_ratio_var) or not self.pred_ratio:
            raise ValueError(
                f"pred_ratio {self.pred_ratio} and pred_ratio_var {self.pred_ratio_var}: one variance per ratio"
            )
        for ratio, var in zip(self.pred_ratio, self.pred_ratio_var, strict=True):
            if not 0 <= var <= ratio or ratio + var > 1:
                raise ValueError(f"pred_ratio {ratio} ± pred_ratio_var {var} must lie in [0, 1] (ratio >= var)")
        if self.use_bn_in_head:
            raise ValueError("iBOT's head has no norm layers in its released runs; use_bn_in_head is not offered")
        if self.student_patch_dim != self.teacher_patch_dim:
            raise ValueError(
                f"the student's patch tokens get {self.student_patch_dim} prototypes and the teacher's "
                f"{self.teacher_patch_dim} (shared_head={self.shared_head}, shared_head_teacher="
                f"{self.shared_head_teacher}): set patch_out_dim = out_dim"
            )

    @property
    def student_patch_dim(self) -> int:
        return self.out_dim if self.shared_head else self.patch_out_dim

    @property
    def teacher_patch_dim(self) -> int:
        return self.out_dim if self.shared_head_teacher else self.patch_out_dim


class IBOTHead(DINOHead):
    """``iBOTHead``: the DINO head for class tokens (``forward``) and, for patch tokens (``forward_patches``), the same
    MLP and l2-normalised bottleneck into the last layer when ``shared`` (iBOT's ``last_layer2 = last_layer``;
    ``last_layer2`` is ``None`` here, so the state dict holds the layer once), else into ``last_layer2``, a
    weight-normed layer of ``patch_out_dim`` prototypes (its g frozen as ``norm_last_layer``)."""

    def __init__(self, in_dim: int, out_dim: int, patch_out_dim: int, shared: bool, norm_last_layer: bool, **kwargs):
        super().__init__(in_dim, out_dim, norm_last_layer=norm_last_layer, **kwargs)
        self.last_layer2 = None
        if not shared:
            self.last_layer2 = WeightNormLinear(self.last_layer.weight_v.shape[1], patch_out_dim)
            self.last_layer2.weight_g.requires_grad_(not norm_last_layer)

    @property
    def patch_last_layer(self) -> nn.Module:
        return self.last_layer if self.last_layer2 is None else self.last_layer2

    def forward_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.patch_last_layer(F.normalize(self.mlp(tokens), dim=-1))


class IBOTMasks:
    """``ImageFolderMask``'s mask of one crop on a (h, w) patch grid: ratio r drawn as the module docstring says,
    then r·h·w patches block-wise or at random. Returns (h·w,) bool, True = masked, patches in row-major order."""

    def __init__(self, grid: tuple[int, int], ratios: Sequence[float], ratio_vars: Sequence[float], shape: str):
        self.grid, self.shape = tuple(grid), shape
        self.ratios = list(zip(ratios, ratio_vars, strict=True))
        self.blocks = BlockMaskingGenerator(grid, min_num_patches=(min(grid) // 3) ** 2, min_aspect=PRED_ASPECT_RATIO)

    def ratio(self, generator: torch.Generator | None = None) -> float:
        drawn = [
            float(torch.empty(()).uniform_(m - v, m + v, generator=generator)) if v > 0 else m for m, v in self.ratios
        ]
        return drawn[int(torch.randint(len(drawn), (), generator=generator))]

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        num_patches = self.grid[0] * self.grid[1]
        high = self.ratio(generator) * num_patches  # a float, as ``ImageFolderMask``'s ``high``
        if self.shape == "block":
            return self.blocks(high, generator).flatten()
        mask = torch.zeros(num_patches, dtype=torch.bool)
        mask[torch.randperm(num_patches, generator=generator)[: int(high)]] = True
        return mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}(grid={self.grid}, ratios={self.ratios}, shape={self.shape!r})"


class IBOTViews(ViewRecipe):
    """DINO's multi-crop and, in ``extras["masks"]``, the (2, L) masks of the two global crops (``IBOTMasks``)."""

    def __init__(self, crops: ViewRecipe, masks: IBOTMasks):
        self.crops, self.masks = crops, masks

    def make_views(self, image) -> Views:
        views = self.crops.make_views(image).views
        return Views(views, {"masks": torch.stack([self.masks(), self.masks()])})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.crops}, {self.masks})"


# ---- the authors' files ---------------------------------------------------------------------------------------------
def _is_ibot_backbone(container) -> bool:
    """``{'state_dict': ...}`` alone, holding a ViT in the authors' (= timm's) names without prefix."""
    state = container.get("state_dict") if isinstance(container, dict) else None
    return (
        set(container) == {"state_dict"}
        and isinstance(state, dict)
        and all(key in state for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"))
    )


def _check_head(head: dict, source: str) -> None:
    """The keys of an ``iBOTHead`` (``nlayers=3``, no norm): ``mlp.*`` and both weight-normed last layers."""
    expected = ("last_layer.weight_g", "last_layer.weight_v", "last_layer2.weight_g", "last_layer2.weight_v")
    missing = [f"head.{key}" for key in expected if key not in head]
    if missing or not any(key.startswith("mlp.") for key in head):
        raise CheckpointError(
            f"{source}: an iBOTHead has head.mlp.* and the keys {missing or list(expected)}; "
            f"the file's head has {sorted(head)[:12]}"
        )


def convert_ibot_backbone(container, source: str) -> Converted:
    """bytedance/ibot ``extract_backbone_weights.py``: ``{'state_dict': ...}`` with the backbone of
    ``ck[checkpoint_key]`` (``backbone.`` / ``module.backbone.`` stripped: timm's ViT names), the student's
    ``masked_embed`` in a student file, and with ``--with_head`` the head's keys as they were (``head.*``, DDP's
    ``module.head.*`` for a student): ``mlp.{0,2,4}``, ``last_layer.*`` and ``last_layer2.*`` (the same tensors twice
    for a shared head, read once). The backbone is the released encoder; with a head, the file initialises the whole
    objective: both encoders and both heads from the file, ``masked_embed`` from it or zero, the centres at zero (their
    initial values: the file has none), and the head's shape (sizes, whether ``last_layer2`` is ``last_layer``) is
    recorded."""
    state = {key.removeprefix("module."): value for key, value in entry(container, "state_dict", source).items()}
    reader = KeyReader(state, source)
    head = reader.take("head.")
    masked_embed = reader.take_one("masked_embed") if "masked_embed" in state else None
    backbone = reader.take("")
    reader.finish()
    left_out = leftover_entries(container, {"state_dict"})
    if not head:
        note = ["masked_embed (a student's; a file without the head initialises the encoders only)"]
        return Converted("ibot_backbone", backbone, left_out=left_out + (note if masked_embed is not None else []))
    _check_head(head, source)
    shared = all(torch.equal(head[f"last_layer.{k}"], head[f"last_layer2.{k}"]) for k in ("weight_g", "weight_v"))
    patch_dim = head["last_layer2.weight_v"].shape[0]
    if shared:
        head = {key: value for key, value in head.items() if not key.startswith("last_layer2.")}
        left_out.append("head.last_layer2.* (the shared head's last_layer again)")
    sizes = _dino_head_sizes(head)
    method = {
        **prefixed("student_head.", head),
        **prefixed("teacher_head.", head),
        "center": torch.zeros(1, sizes["out_dim"]),
        "center2": torch.zeros(1, 1, patch_dim),
        "masked_embed": torch.zeros(1, backbone["cls_token"].shape[-1]) if masked_embed is None else masked_embed,
    }
    overrides = {**sizes, "patch_out_dim": patch_dim, "shared_head": shared, "shared_head_teacher": shared}
    encoders = {"student.backbone.": backbone, "teacher.backbone.": backbone}
    left_out += ["center, center2 (not in the file: they start at zero, as a new run's)"]
    return Converted("ibot_backbone", backbone, method, encoders, overrides, left_out)


@register_method("ibot")
class IBOT(DINO):
    """DINO's student, teacher, multi-crop loss on the class tokens and schedules, plus the masked global crops of the
    student, ``masked_embed``, the patch head ``last_layer2``, its centre ``center2`` and the masked-patch loss (the
    module docstring). The released encoder is the teacher's backbone."""

    Hparams = IBOTHparams
    paper = "iBOT: Image BERT Pre-Training with Online Tokenizer"
    arxiv = "2111.07832"
    citation = (
        "@inproceedings{zhou2022ibot,\n  title={iBOT: Image BERT Pre-Training with Online Tokenizer},\n  author={Zhou,"
        " Jinghao and Wei, Chen and Wang, Huiyu and Shen, Wei and Xie, Cihang and Yuille, Alan and Kong, Tao},\n"
        "  booktitle={International Conference on Learning Representations (ICLR)},\n  year={2022}\n}"
    )
    released = "teacher backbone (without the iBOT head)"
    # evaluation/eval_linear.py: SGD lr 0.001 per 256 images, 100 epochs, batch 128 per GPU (the README's numbers
    # sweep the lr with eval_linear_multi.py)
    linear_recipe = LinearRecipe("bytedance/ibot evaluation/eval_linear.py (on the pooled features)", 0.001, 100, 1024)
    checkpoint_layouts = (CheckpointLayout("ibot_backbone", _is_ibot_backbone, convert_ibot_backbone),)
    tiny_preset = "ibot_vit_tiny_patch4_32px"
    tiny_overrides = {
        "out_dim": 256,
        "patch_out_dim": 256,
        "hidden_dim": 64,
        "bottleneck_dim": 32,
        "local_crops_number": 2,
        "backbone_kwargs": {"depth": 2},
    }

    def __init__(self, config):
        super().__init__(config)
        hp, vit = self.hparams, self.student.backbone
        if not is_vision_transformer(vit) or getattr(vit, "cls_token", None) is None or vit.num_prefix_tokens != 1:
            raise ValueError(f"iBOT needs a timm ViT with a class token and no register tokens: {config.backbone!r}")
        self.patch_size = vit.patch_embed.patch_size
        self.masked_embed = nn.Parameter(torch.zeros(1, vit.num_features))
        self.register_buffer("center2", torch.zeros(1, 1, hp.teacher_patch_dim))
        self.teacher_patch_temperature = hp.warmup_teacher_patch_temp
        self.predicting = hp.pred_start_epoch == 0

    def build_head(self, in_dim: int, student: bool) -> IBOTHead:
        hp = self.hparams
        return IBOTHead(
            in_dim,
            hp.out_dim,
            hp.patch_out_dim,
            shared=hp.shared_head if student else hp.shared_head_teacher,
            norm_last_layer=hp.norm_last_layer if student else True,
            hidden_dim=hp.hidden_dim,
            bottleneck_dim=hp.bottleneck_dim,
            nlayers=hp.head_layers,
        )

    def init_teacher_head(self) -> None:
        """``teacher.load_state_dict(student.state_dict(), strict=False)``: the MLP, the last layer, then the patch
        tokens' last layer (so a shared teacher layer starts as a separate student ``last_layer2``, as there)."""
        student, teacher = self.student_head, self.teacher_head
        for source, target in (
            (student.mlp, teacher.mlp),
            (student.last_layer, teacher.last_layer),
            (student.patch_last_layer, teacher.patch_last_layer),
        ):
            target.load_state_dict(source.state_dict())

    # ---- views and masks ---------------------------------------------------------------------------------------
    def masks_for(self, grid: tuple[int, int]) -> IBOTMasks:
        hp = self.hparams
        return IBOTMasks(grid, hp.pred_ratio, hp.pred_ratio_var, hp.pred_shape)

    def view_recipe(self):
        cfg = self.config
        crops = dino_views(cfg.image_size, self.local_crop_size(), self.hparams, cfg.image_mean, cfg.image_std)
        return IBOTViews(crops, self.masks_for(self._grid(cfg.image_size, cfg.image_size)))

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size[0], width // self.patch_size[1]

    def global_masks(self, batch: Batch, global_crops: torch.Tensor) -> torch.Tensor:
        """(2B, L) masks of the global crops, crop 1's images then crop 2's: ``batch.extras["masks"]`` (B, 2, L) from
        ``IBOTViews``, drawn here when absent; none before ``pred_start_epoch``."""
        grid = self._grid(*global_crops.shape[-2:])
        num_patches = grid[0] * grid[1]
        masks = batch.extras.get("masks")
        if masks is None:
            masks = torch.stack([self.masks_for(grid)() for _ in range(len(global_crops))])
        else:
            if masks.shape != (len(global_crops) // 2, 2, num_patches):
                raise ValueError(
                    f"iBOT masks: expected (batch, 2, {num_patches}) for {grid[0]}x{grid[1]} patches of "
                    f"the global crops, got {tuple(masks.shape)}"
                )
            masks = masks.transpose(0, 1).reshape(-1, num_patches)
        masks = masks.to(device=global_crops.device, dtype=torch.bool)
        return masks if self.predicting else torch.zeros_like(masks)

    # ---- schedules ---------------------------------------------------------------------------------------------
    def teacher_patch_temperature_at(self, epoch: int) -> float:
        """``teacher_temp2_schedule``: ``warmup_teacher_patch_temp`` until ``pred_start_epoch``, then DINO's linear
        warm-up to ``teacher_patch_temp`` over ``warmup_teacher_temp_epochs``."""
        hp = self.hparams
        if epoch < hp.pred_start_epoch:
            return hp.warmup_teacher_patch_temp
        return warmup_then_constant(
            hp.warmup_teacher_patch_temp,
            hp.teacher_patch_temp,
            hp.warmup_teacher_temp_epochs,
            epoch - hp.pred_start_epoch,
        )

    def on_step_start(self, progress: TrainingProgress) -> None:
        super().on_step_start(progress)
        self.teacher_patch_temperature = self.teacher_patch_temperature_at(progress.epoch)
        self.predicting = progress.epoch >= self.hparams.pred_start_epoch

    # ---- objective ---------------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> MethodOutput:
        """``batch.views``: 2 global crops, then local crops of one size; ``batch.extras["masks"]`` (B, 2, L) the
        masks of the global crops (``global_masks``)."""
        views = batch.views
        if len(views) < 2:
            raise ValueError(f"iBOT takes 2 global crops (+ local crops), got {len(views)} view(s)")
        hp = self.hparams
        global_crops = torch.cat(views[:2])
        masks = self.global_masks(batch, global_crops)
        with torch.no_grad():
            tokens = self.teacher.forward_features(global_crops)
            teacher_cls = self.teacher_head(tokens[:, 0])
            teacher_patches = self.teacher_head.forward_patches(tokens[:, 1:])
        tokens = masked_forward_features(self.student.backbone, global_crops, masks, self.masked_embed)
        student_cls = [self.student_head(tokens[:, 0])]
        if len(views) > 2:
            student_cls.append(self.student_head(forward_by_resolution(self.student, views[2:])))
        cls_loss = dino_cross_entropy(
            torch.cat(student_cls).chunk(len(views)),
            teacher_cls.chunk(2),
            self.center,
            hp.student_temp,
            self.teacher_temperature,
        )
        targets = F.softmax((teacher_patches - self.center2) / self.teacher_patch_temperature, dim=-1)[masks]
        student_patches = self.student_head.forward_patches(tokens[:, 1:][masks])
        patch_loss = ibot_patch_cross_entropy(student_patches, targets, masks, hp.student_temp)
        if self.training:
            self._update_center(teacher_cls)
            self._update_patch_center(teacher_patches)
        metrics = {"cls_loss": cls_loss.item(), "patch_loss": patch_loss.item()}
        temperatures = {
            "teacher_temperature": self.teacher_temperature,
            "teacher_patch_temperature": self.teacher_patch_temperature,
        }
        return MethodOutput(hp.lambda1 * cls_loss + hp.lambda2 * patch_loss, {**metrics, **temperatures})

    @torch.no_grad()
    def _update_patch_center(self, teacher_patches: torch.Tensor) -> None:
        """``c' ← m c' + (1 - m) mean over images of the mean over patches`` (``update_center``'s ``center2``)."""
        batch_center = mean_over_processes(teacher_patches.mean(dim=1).mean(dim=0)).view_as(self.center2)
        momentum = self.hparams.patch_center_momentum
        self.center2.mul_(momentum).add_(batch_center, alpha=1 - momentum)

    # ---- updates outside the forward pass ----------------------------------------------------------------------
    def student_parameters(self) -> list[nn.Parameter]:
        return [*super().student_parameters(), self.masked_embed]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """``cancel_gradients_last_layer``: every parameter with "last_layer" in its name (``last_layer2`` too)."""
        head = self.student_head
        return list(
            {id(p): p for layer in (head.last_layer, head.patch_last_layer) for p in layer.parameters()}.values()
        )

    def momentum_pairs(self):
        """The parameters student and teacher have in common (``names_common`` of ``train_one_epoch``): backbone,
        head MLP and last layer, and ``last_layer2`` when neither head shares it; never ``masked_embed``. A shared
        teacher layer follows the student's ``last_layer``."""
        student, teacher, hp = self.student_head, self.teacher_head, self.hparams
        pairs = [(self.student, self.teacher), (student.mlp, teacher.mlp), (student.last_layer, teacher.last_layer)]
        if not (hp.shared_head or hp.shared_head_teacher):
            pairs.append((student.last_layer2, teacher.last_layer2))
        return pairs


for _size in ("small", "base"):
    register_preset(
        Preset(
            f"ibot_vit_{_size}_patch16_224",
            "ibot",
            f"vit_{_size}_patch16_224",
            # ViT-B/16: --norm_last_layer "True with vit_base" (main_ibot.py help), 400 epochs (1600 effective)
            method_kwargs={} if _size == "small" else {"norm_last_layer": True, "epochs": 400},
            description=f"iBOT on a timm vit_{_size}_patch16_224: the README's ViT-S/16 recipe (2 x 224 + 10 x 96 "
            "crops, block masks of half of the global crops, shared 8192-prototype head)"
            + ("" if _size == "small" else "; weight-normed last layer frozen at g = 1, 400 epochs"),
        )
    )

register_preset(
    Preset(
        "ibot_vit_tiny_patch4_32px",
        "ibot",
        "vit_tiny_patch16_224",
        image_size=32,
        backbone_kwargs={"img_size": 32, "patch_size": 4},
        method_kwargs={
            "out_dim": 1024,
            "local_crop_size": 16,
            "local_crops_number": 6,
            "warmup_epochs": 2,
            "warmup_teacher_temp_epochs": 5,
        },
        description="iBOT, ViT-Tiny with 4 px patches for 32 px images: 16 px local crops (6), a shared head of 1024 "
        "prototypes, short warm-ups",
    )
)

IBOT_RELEASES = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot"
# bytedance/ibot README, "Pre-Trained Models" (ImageNet-1k, block masking; k-NN / linear / fine-tuning top-1); the
# ViT-S/16 run is the README's 800-epoch command. Both releases are named checkpoint_teacher.pth.
for _preset, _folder, _knn, _linear, _finetune, _epochs in (
    ("ibot_vit_small_patch16_224", "vits_16", 75.2, 77.9, 82.3, 800),
    ("ibot_vit_base_patch16_224", "vitb_16", 77.1, 79.5, 84.0, None),
):
    register_pretrained(
        PretrainedTag(
            _preset,
            "in1k",
            url=f"{IBOT_RELEASES}/{_folder}/checkpoint_teacher.pth",
            layout="ibot_backbone",
            license="apache-2.0",
            epochs=_epochs,
            metrics={"knn": _knn, "linear": _linear, "finetune": _finetune},
            source="bytedance/ibot README, Pre-Trained Models (block masking, ImageNet-1k)",
            download_name=f"ibot_{_folder}_checkpoint_teacher.pth",
        )
    )
