"""VISSL's model and checkpoint written out (facebookresearch/vissl), for the tests of the methods it releases."""

import torch
import torchvision
from helpers import random_batch_norm_statistics
from torch import nn


class VisslTrunk(nn.Module):
    """vissl/models/trunks/resnext.py: torchvision's ResNet parts in ``_feature_blocks``, run in order."""

    def __init__(self, arch: str):
        super().__init__()
        net = getattr(torchvision.models, arch)()
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
        blocks = [(name if name != "relu" else "conv1_relu", getattr(net, name)) for name in names]
        self._feature_blocks = nn.ModuleDict([*blocks, ("flatten", nn.Flatten(1))])

    def forward(self, x):
        for block in self._feature_blocks.values():
            x = block(x)
        return x


class VisslMLP(nn.Module):
    """vissl/models/heads/mlp.py ``mlp`` with ``dims [in, out]``: ``clf = Sequential(Linear)``."""

    def __init__(self, dims):
        super().__init__()
        self.clf = nn.Sequential(nn.Linear(*dims))

    def forward(self, x):
        return self.clf(x)


class VisslModel(nn.Module):
    """BaseSSLMultiInputOutputModel: ``trunk`` + ``heads`` (a ModuleList), RotNet's head ``mlp [2048, 4]``."""

    def __init__(self, arch: str, head_dims=((None, 4),)):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = VisslTrunk(arch)
        width = self.trunk._feature_blocks["layer4"][-1].conv1.in_channels
        self.heads = nn.ModuleList(VisslMLP((d_in or width, d_out)) for d_in, d_out in head_dims)
        random_batch_norm_statistics(self)

    def forward(self, x):
        return self.heads[0](self.trunk(x))


def vissl_checkpoint(model: VisslModel) -> dict:
    """vissl/hooks/log_hooks.py's checkpoint of a ClassyTask: the model under classy_state_dict.base_model."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {
        "phase_idx": 125,
        "iteration": 525000,
        "loss": {},
        "iteration_num": 525000,
        "train_phase_idx": 104,
        "classy_state_dict": {
            "train": True,
            "base_model": {
                "model": {"trunk": model.trunk.state_dict(), "heads": model.heads.state_dict()},
                "meta": {"trunk": {}, "heads": []},
            },
            "meters": [{"name": "accuracy_list_meter", "state": {"top_1": [0.9]}}],
            "optimizer": {"optim": optimizer.state_dict(), "num_updates": 525000},
            "phase_idx": 125,
            "train_phase_idx": 104,
            "num_updates": 525000,
            "losses": [0.41, 0.39],
            "hooks": {},
            "loss": {},
        },
    }
