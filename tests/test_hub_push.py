"""Push to and download from a Hub-compatible server on loopback (``tests/hub_server.py``) with the real
huggingface_hub client: ``sslhub push``, ``model.push_to_hub``, ``sslhub.from_pretrained`` and their errors.

How the client is pointed at the server: huggingface_hub reads its environment once, at import, into
``huggingface_hub.constants`` (``ENDPOINT``, the resolve-URL template, ``HF_HUB_OFFLINE``, cache and token paths, the
xet switch). The ``hub`` fixture (conftest.py) sets the environment with ``monkeypatch`` and executes a fresh copy of
that module under it, so every constant is recomputed exactly as the library would at start-up, and patches the live
module with the result; ``monkeypatch`` restores all of it after the test, so ``HF_HUB_OFFLINE=1`` (conftest) holds
for every other test. In-process rather than in a subprocess because importing torch + transformers again costs
seconds per call.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hub_server import READ_TOKEN, WRITE_TOKEN, client_constants
from huggingface_hub import ModelCard, _commit_api, constants
from safetensors.torch import save as safetensors_bytes
from torch.utils.tensorboard import SummaryWriter

import sslhub
from sslhub.cli import main as cli_main
from sslhub.hub import HubError, push_checkpoint
from sslhub.hub.cards import PLACEHOLDER_REPO
from sslhub.hub.curves import training_curves_png
from sslhub.hub.push import CURVES_FILE

TINY = "mae_vit_tiny_patch4_32px"


def tiny_model(seed: int = 0, task: str = "features"):
    torch.manual_seed(seed)
    return sslhub.create_model(TINY, task=task, backbone_kwargs={"depth": 1})


def saved(model, directory):
    model.save_pretrained(directory)
    return directory


def assert_same_weights(a, b) -> None:
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)


def sslhub_files(model) -> dict[str, bytes]:
    """config.json + model.safetensors of ``model``, as a repo's files."""
    config = model.config.to_dict() | {"architectures": [type(model).__name__]}
    weights = {key: value.contiguous() for key, value in model.state_dict().items()}
    return {"config.json": json.dumps(config).encode(), "model.safetensors": safetensors_bytes(weights)}


def test_push_uploads_config_weights_and_card_in_one_commit_and_downloads_into_a_fresh_cache(hub, tmp_path):
    model = tiny_model()
    directory = saved(model, tmp_path / "ckpt")
    info = push_checkpoint(directory, "me/tiny")
    assert hub.requests.count(("POST", "commit")) == 1 and ("PUT", "lfs-upload") in hub.requests
    files = hub.files("me/tiny")
    assert sorted(files) == [
        ".gitattributes", "README.md", "config.json", "model.safetensors", "preprocessor_config.json"
    ]  # fmt: skip
    assert files["model.safetensors"] == (directory / "model.safetensors").read_bytes()
    card = (directory / "README.md").read_text()
    assert PLACEHOLDER_REPO in card and files["README.md"].decode() == card.replace(PLACEHOLDER_REPO, "me/tiny")
    assert hub.commits("me/tiny")[0].oid == info.oid
    loaded = sslhub.from_pretrained("me/tiny")
    assert type(loaded) is sslhub.SSLModel
    assert_same_weights(model, loaded)


def test_cli_push_overwrite_and_revision_pinning(hub, tmp_path, monkeypatch, capsys):
    first, second = tiny_model(0), tiny_model(1)
    assert cli_main(["push", str(saved(first, tmp_path / "a")), "--repo-id", "me/pin"]) == 0
    old = hub.commits("me/pin")[0].oid
    assert old in capsys.readouterr().out
    assert cli_main(["push", str(saved(second, tmp_path / "b")), "--repo-id", "me/pin", "--commit-message", "v2"]) == 0
    assert hub.commits("me/pin")[0].message == "v2"
    assert_same_weights(second, sslhub.from_pretrained("me/pin"))
    assert_same_weights(first, sslhub.from_pretrained("me/pin", revision=old))
    assert_same_weights(first, sslhub.from_pretrained("me/pin", revision=old[:7]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # from here on: the cache only
    hub.requests.clear()
    assert_same_weights(first, sslhub.from_pretrained("me/pin", revision=old))
    assert_same_weights(second, sslhub.from_pretrained("me/pin"))
    assert hub.requests == []


def test_push_to_a_branch_and_stale_shards_are_deleted(hub, tmp_path):
    model = tiny_model()
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    push_checkpoint(sharded, "me/shards")
    push_checkpoint(saved(tiny_model(1), tmp_path / "dev"), "me/shards", revision="dev")
    assert "model.safetensors.index.json" in hub.files("me/shards", "main")
    assert_same_weights(model, sslhub.from_pretrained("me/shards"))
    push_checkpoint(saved(model, tmp_path / "single"), "me/shards")
    weights = sorted(path for path in hub.files("me/shards") if "safetensors" in path)
    assert weights == ["model.safetensors"]
    assert_same_weights(tiny_model(1), sslhub.from_pretrained("me/shards", revision="dev"))


def test_model_push_to_hub_keeps_the_sslhub_card(hub):
    model = tiny_model(task="pretraining")
    model.push_to_hub("me/pre", commit_message="from python")
    assert hub.requests.count(("POST", "commit")) == 1 and hub.commits("me/pre")[0].message == "from python"
    card = ModelCard(hub.files("me/pre")["README.md"].decode())
    assert card.data.library_name == "sslhub" and 'sslhub.from_pretrained("me/pre")' in card.text
    loaded = sslhub.from_pretrained("me/pre")
    assert type(loaded) is sslhub.SSLForPreTraining
    assert_same_weights(model, loaded)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d.mkdir(), "has no config.json"),
        (lambda d: saved(tiny_model(), d) and (d / "pytorch_model.bin").write_bytes(b"x"), r"pickle files \("),
        (lambda d: saved(tiny_model(), d) and (d / "README.md").unlink(), "has no README.md"),
        (lambda d: d.mkdir() or (d / "config.json").write_text('{"model_type": "vit"}'), "transformers 'vit' model"),
        (lambda d: None, "is not a directory"),
    ],
    ids=["empty", "pickle", "no-card", "transformers", "missing"],
)
def test_push_refuses_what_is_not_a_pushable_checkpoint(hub, tmp_path, capsys, setup, message):
    setup(tmp_path / "dir")
    with pytest.raises(HubError, match=message) as caught:
        push_checkpoint(tmp_path / "dir", "me/refused")
    capsys.readouterr()  # the progress bars of save_pretrained
    assert cli_main(["push", str(tmp_path / "dir"), "--repo-id", "me/refused"]) == 2
    assert capsys.readouterr().err == f"sslhub push: error: {caught.value}\n"
    assert hub.requests == [] and "me/refused" not in hub.repos


def test_private_repo_with_and_without_token(hub, tmp_path, monkeypatch):
    model = tiny_model()
    assert cli_main(["push", str(saved(model, tmp_path / "m")), "--repo-id", "me/secret", "--private"]) == 0
    assert hub.repos["me/secret"].private
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="^me/secret is private, gated or missing on .*: log in with a token"):
        sslhub.from_pretrained("me/secret")
    with pytest.raises(HubError, match="^pushing to me/secret needs a Hugging Face token with write access"):
        push_checkpoint(tmp_path / "m", "me/secret")
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    assert_same_weights(model, sslhub.from_pretrained("me/secret"))
    with pytest.raises(HubError, match="^your Hugging Face token cannot write to me/secret"):
        push_checkpoint(tmp_path / "m", "me/secret")
    assert len(hub.commits("me/secret")) == 2  # the repo's initial commit and the first push


PICKLE = b"\x80\x04pickled"


def refused_repo_files(kind: str) -> dict[str, bytes]:
    """The files of a repo that sslhub must refuse to load."""
    files = sslhub_files(tiny_model())
    return {
        "pickle-only": {"config.json": files["config.json"], "pytorch_model.bin": PICKLE},
        "transformers": {"config.json": b'{"model_type": "vit"}', "model.safetensors": files["model.safetensors"]},
        "torch": {"pytorch_model.bin": PICKLE},  # a plain PyTorch release
    }[kind]


@pytest.mark.parametrize(
    ("repo", "kind", "kwargs", "message"),
    [
        ("me/nothing", None, {}, "^there is no Hub repo me/nothing on http://127.0.0.1"),
        ("me/ok", "ok", {"revision": "v9"}, "^me/ok has no revision 'v9'"),
        ("me/pickle", "pickle-only", {}, "^me/pickle .revision main. has no model.safetensors: .* never pickles"),
        ("me/vit", "transformers", {}, "^me/vit .* is a transformers 'vit' model, not an sslhub checkpoint: convert"),
        ("me/torch", "torch", {}, "^me/torch has no config.json, so it is not an sslhub checkpoint .*sslhub convert"),
        ("me/gated", "gated", {"token": False}, "^me/gated is gated: request access"),
        ("./no/such/dir", None, {}, "is neither a local directory nor a Hub repo id"),
    ],
)
def test_download_errors_are_one_sentence(hub, tmp_path, capsys, repo, kind, kwargs, message):
    if kind in ("ok", "gated"):
        hub.add_repo(repo, sslhub_files(tiny_model()), gated=kind == "gated")
    elif kind is not None:
        hub.add_repo(repo, refused_repo_files(kind))
    with pytest.raises(HubError, match=message) as caught:
        sslhub.from_pretrained(repo, **kwargs)
    error = caught.value
    assert (
        "\n" not in str(error) and error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    )
    if not kwargs and "." not in repo:
        assert cli_main(["export", "--model", repo, "--format", "timm", "--output", str(tmp_path / "x")]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"sslhub export: error: {error}"  # after progress bars


def test_offline_download_without_cache_and_offline_push_are_one_sentence(hub, monkeypatch, tmp_path):
    hub.add_repo("me/later", sslhub_files(tiny_model()))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=r"^me/later \(revision main\) is not in the Hugging Face cache and HF_HUB_OFF"):
        sslhub.from_pretrained("me/later")
    with pytest.raises(HubError, match="^cannot push .* to me/later while HF_HUB_OFFLINE is set$"):
        push_checkpoint(saved(tiny_model(), tmp_path / "m"), "me/later")
    assert hub.requests == []


def test_loading_fetches_only_config_and_safetensors_and_never_remote_code(hub, monkeypatch, tmp_path):
    model = tiny_model()
    config = json.loads(sslhub_files(model)["config.json"]) | {"auto_map": {"AutoModel": "evil.EvilModel"}}
    files = sslhub_files(model) | {
        "config.json": json.dumps(config).encode(),
        "evil.py": b"raise SystemExit('remote code ran')\n",
        "pytorch_model.bin": PICKLE,
    }
    hub.add_repo("me/mixed", files)
    seen = []
    original = sslhub.SSLModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(sslhub.SSLModel, "from_pretrained", classmethod(spy))
    assert_same_weights(model, sslhub.from_pretrained("me/mixed"))
    assert seen and all("trust_remote_code" not in kwargs and kwargs["use_safetensors"] for kwargs in seen)
    cached = {p.name for p in (tmp_path / "hf_home" / "hub").rglob("*") if p.is_file() and "snapshots" in p.parts}
    assert cached == {"config.json", "model.safetensors"}


@pytest.mark.parametrize("interruption", ["server-fails-commit", "client-interrupted-after-preupload"])
def test_interrupted_upload_leaves_no_partial_commit(hub, tmp_path, monkeypatch, interruption):
    push_checkpoint(saved(tiny_model(0), tmp_path / "a"), "me/atomic")
    before = hub.files("me/atomic")
    if interruption == "server-fails-commit":
        hub.fail_next("commit", 500)
        with pytest.raises(HubError, match="^pushing .* to me/atomic failed .HTTP 500.*nothing was committed"):
            push_checkpoint(saved(tiny_model(1), tmp_path / "b"), "me/atomic")
    else:

        def interrupt(**kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(_commit_api, "_send_commit", interrupt)  # after preupload and the LFS upload
        with pytest.raises(KeyboardInterrupt):
            push_checkpoint(saved(tiny_model(1), tmp_path / "b"), "me/atomic")
    assert ("PUT", "lfs-upload") in hub.requests[hub.requests.index(("POST", "commit")) + 1 :]
    assert hub.files("me/atomic") == before and len(hub.commits("me/atomic")) == 2


def test_token_is_never_printed_or_logged(hub, tmp_path, monkeypatch, capfd, caplog):
    from huggingface_hub.utils import logging as hf_logging

    caplog.set_level(logging.DEBUG)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_debug()
    try:
        directory = saved(tiny_model(), tmp_path / "m")
        assert cli_main(["push", str(directory), "--repo-id", "me/tok", "--private"]) == 0
        sslhub.from_pretrained("me/tok", force_download=True)
        changed = saved(tiny_model(1), tmp_path / "changed")  # changed files: the Hub would skip unchanged ones
        hub.fail_next("commit", 500)
        assert cli_main(["push", str(changed), "--repo-id", "me/tok"]) == 2
        hub.fail_next("preupload", 403)
        assert cli_main(["push", str(changed), "--repo-id", "me/tok"]) == 2
        hub.fail_next("resolve", 401)
        with pytest.raises(HubError) as caught:
            sslhub.from_pretrained("me/tok", force_download=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    out, err = capfd.readouterr()
    assert "HTTP 500" in err and "HTTP 403" in err and caplog.records
    for text in (out, err, caplog.text, str(caught.value)):
        assert WRITE_TOKEN not in text and WRITE_TOKEN[3:15] not in text  # nor a fragment of it


def write_events(log_dir, steps: int = 3) -> None:
    writer = SummaryWriter(str(log_dir))
    for step in range(1, steps + 1):
        writer.add_scalar("train/loss", 5.0 / step, step)
        writer.add_scalar("train/lr", 0.1 * step, step)
    writer.close()


def test_training_curves_from_tensorboard_logs(hub, tmp_path):
    out = tmp_path / "out"
    saved(tiny_model(), out)
    assert training_curves_png(tmp_path) is None
    write_events(out / "sslhub")
    png = training_curves_png(out / "sslhub")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    push_checkpoint(out, "me/curves", with_logs=True)
    files = hub.files("me/curves")
    assert files[CURVES_FILE] == png
    assert f"![Training curves]({CURVES_FILE})" in files["README.md"].decode()
    assert any(path.startswith("runs/events.out.tfevents.") for path in files)


def test_rendered_card_passes_hub_metadata_validation_and_a_broken_one_does_not(hub, tmp_path):
    model = tiny_model()
    card = model.model_card(training={"data": "builtin", "epochs": 1}, results={"kNN top-1 (k=20)": 0.5})
    card.validate()
    broken = str(card).replace("value: 0.5", "value: half")
    with pytest.raises(ValueError, match="metric value must be a number"):
        ModelCard(broken, ignore_metadata_errors=True).validate()
    directory = saved(model, tmp_path / "m")
    (directory / "README.md").write_text(broken)
    with pytest.raises(
        HubError, match=r'rejects the model card of .*: - "kNN top-1 \(k=20\)": the metric value must be a number$'
    ):
        push_checkpoint(directory, "me/broken")
    assert len(hub.commits("me/broken")) == 1  # only the repo's creation


def test_pretrain_push_and_load_end_to_end(hub, tmp_path, monkeypatch):
    """``sslhub pretrain ... && sslhub push out --repo-id me/my-moco``, then ``from_pretrained`` on a clean cache."""
    out = tmp_path / "out"
    args = ["--model", "moco_v2_resnet18_32px", "--data", "builtin", "--max-steps", "2", "--batch-size", "32"]
    args += ["--knn-every", "0", "--log-every", "1", "--no-progress", "--output-dir", str(out)]
    assert cli_main(["pretrain", *args]) == 0
    assert cli_main(["push", str(out), "--repo-id", "me/my-moco", "--with-logs"]) == 0
    assert cli_main(["push", str(out / "pretraining"), "--repo-id", "me/my-moco-pretraining"]) == 0
    files = hub.files("me/my-moco")
    assert {"config.json", "model.safetensors", "README.md", CURVES_FILE} <= set(files)
    assert not any(path.startswith("checkpoints/") or path.endswith((".bin", ".pkl")) for path in files)
    card = ModelCard(files["README.md"].decode())
    card.validate()
    assert card.data.library_name == "sslhub" and "moco_v2" in card.data.tags
    assert 'sslhub.from_pretrained("me/my-moco")' in card.text
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "clean-cache"))
    loaded = sslhub.from_pretrained("me/my-moco")
    assert type(loaded) is sslhub.SSLModel
    assert_same_weights(sslhub.from_pretrained(out), loaded)
    assert type(sslhub.from_pretrained("me/my-moco-pretraining")) is sslhub.SSLForPreTraining


def test_the_other_tests_stay_offline():
    """Runs after the tests above: the ``hub`` fixture gave huggingface_hub its import-time constants back."""
    assert constants.HF_HUB_OFFLINE
    assert all(getattr(constants, name) == value for name, value in client_constants().items())
