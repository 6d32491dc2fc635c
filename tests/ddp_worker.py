"""Run by ``torchrun`` from test_distributed.py: a tiny pretraining, then each rank writes a digest of its state."""

import hashlib
import json
import os
import sys

import torch

from sslhub.training import PretrainArguments, pretrain

torch.set_num_threads(1)
output_dir, data, model, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
result = pretrain(
    PretrainArguments(
        model=model,
        data=data,
        output_dir=output_dir,
        epochs=2,
        batch_size=8,
        overrides=overrides,
        log_with=None,
        progress=False,
        knn_every=0,
    )
)
state = result.model.state_dict()
report = {
    "num_processes": result.num_processes,
    "losses": result.losses,
    "digests": {
        key: hashlib.sha256(value.detach().cpu().numpy().tobytes()).hexdigest() for key, value in state.items()
    },
    "parameters": [name for name, _ in result.model.named_parameters()],
    "batch_norms": sorted(
        {type(m).__name__ for m in result.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    ),
}
with open(os.path.join(output_dir, f"rank{os.environ['RANK']}.json"), "w") as handle:
    json.dump(report, handle)
