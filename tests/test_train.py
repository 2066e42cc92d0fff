"""train.py (and cifar10.py, its data) end to end on tiny generated data: both data layouts,
checkpoint/resume, metrics and plot files, two-process data parallelism, native-vs-manual
equivalence, mixed precision and clear errors."""

import csv
import json
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import manualconv
from manualconv import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cifar10  # noqa: E402
import train  # noqa: E402

TRAIN_PY = os.path.join(ROOT, "train.py")
CLASSES = ["cat", "dog", "ship"]
# a small, fast configuration shared by the runs below
TINY = ["--model", "tiny", "--width", "4", "--batch-size", "8", "--threads", "1", "--quiet", "--no-download"]
AIRBENCH = ["--model", "airbench", "--width", "4,8,8", "--batch-size", "8", "--threads", "1", "--quiet",
            "--no-download", "--preset", "cpu"]


@pytest.fixture(autouse=True)
def restore_torch_state():
    """main() sets process-wide torch state; give the other tests theirs back."""
    threads, deterministic, backend = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), \
        manualconv.get_backend()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    manualconv.set_backend(backend)


def random_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def write_folder(root, n_train=8, n_test=4, ext="png"):
    """ImageFolder tree; returns {split: (images N x 32 x 32 x 3, labels)} in train.py's order
    (classes sorted, files sorted within a class)."""
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = [], []
        for label, name in enumerate(CLASSES):
            os.makedirs(os.path.join(root, split, name))
            for i, image in enumerate(random_images(n, 10 * label + (split == "test"))):
                Image.fromarray(image).save(os.path.join(root, split, name, f"{i:04d}.{ext}"),
                                            **(dict(quality=95, subsampling=0) if ext == "jpg" else {}))
                images.append(image)
                labels.append(label)
        out[split] = (np.stack(images), np.array(labels))
    return out


def write_batches(folder, per_batch=8, n_test=12):
    """A fake cifar-10-batches-py: pickled dicts {b'data': N x 3072 uint8, b'labels': [...]}."""
    os.makedirs(folder)
    rng = np.random.default_rng(1)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        entry = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
        written[name] = entry
    return written


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("folder"))
    return root, write_folder(root)


@pytest.fixture(scope="module")
def batches_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("batches"))
    return root, write_batches(os.path.join(root, "cifar-10-batches-py"))


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, TRAIN_PY, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------------------- data loading

def test_folder_layout_loads_exact_pixels_and_caches(tmp_path):
    root = str(tmp_path / "d")
    written = write_folder(root, n_train=3, n_test=2)
    data = cifar10.load_cifar10(root, workers=2, download=False, log=lambda *a: None)
    assert data["classes"] == CLASSES
    for split in ("train", "test"):
        images, labels = written[split]
        assert torch.equal(data[f"{split}_x"], torch.from_numpy(images).permute(0, 3, 1, 2))
        assert torch.equal(data[f"{split}_y"], torch.from_numpy(labels))
    assert os.path.isfile(os.path.join(root, cifar10.CACHE_NAME))
    # the cache is used, and rebuilt when an image changes
    logs = []
    again = cifar10.load_cifar10(root, workers=1, download=False, log=logs.append)
    assert "cache" in logs[0] and torch.equal(again["train_x"], data["train_x"])
    path = os.path.join(root, "train", "cat", "0000.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    os.utime(path, ns=(1, 1))
    changed = cifar10.load_cifar10(root, workers=1, download=False, log=logs.append)
    assert changed["train_x"][0].sum() == 0 and not torch.equal(changed["train_x"], data["train_x"])


@pytest.mark.parametrize("inner", [True, False], ids=["root-with-cifar-10-batches-py", "the-folder-itself"])
def test_pickled_batches_load_exactly(batches_data, inner):
    root, written = batches_data
    path = root if inner else os.path.join(root, "cifar-10-batches-py")
    data = cifar10.load_cifar10(path, download=False, log=lambda *a: None)
    expected_train = np.concatenate([written[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    assert torch.equal(data["train_x"], torch.from_numpy(expected_train).view(-1, 3, 32, 32))
    assert data["test_y"].tolist() == written["test_batch"][b"labels"]
    assert len(data["classes"]) == 10


def test_augmentation_crops_flips_and_normalises():
    x = torch.arange(2 * 3 * 32 * 32).remainder(251).to(torch.uint8).view(2, 3, 32, 32)
    dy, dx, flip = torch.tensor([0, 4]), torch.tensor([4, 2]), torch.tensor([False, True])
    out = cifar10.augment(x, dy, dx, flip, 2, "zeros")
    mean = torch.tensor(cifar10.CIFAR_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(cifar10.CIFAR_STD).view(3, 1, 1) * 255
    raw = out * std + mean
    # image 0: shifted up by 2 rows (2 zero rows on top), left by 2 columns (2 zero columns at the right)
    assert torch.allclose(raw[0, :, 2:, :30], x[0, :, :30, 2:].float(), atol=1e-3)
    assert torch.allclose(raw[0, :, :2], torch.zeros(3, 2, 32), atol=1e-3)
    # image 1: rows 2.. and columns as they were, then mirrored
    assert torch.allclose(raw[1, :, :30].flip(2), x[1, :, 2:].float(), atol=1e-3)
    reflect = cifar10.augment(x, dy, dx, flip, 2, "reflect") * std + mean
    # reflect padding mirrors without repeating the edge: padded rows 0, 1 are rows 2, 1
    assert torch.allclose(reflect[0, :, 0, :30], x[0, :, 2, 2:].float(), atol=1e-3)
    assert torch.allclose(reflect[0, :, 1, :30], x[0, :, 1, 2:].float(), atol=1e-3)
    # epoch plans are reproducible and flips alternate between epochs
    a, b = cifar10.epoch_plan(50, 3, 7, 2), cifar10.epoch_plan(50, 3, 7, 2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert torch.equal(cifar10.epoch_plan(50, 4, 7, 2)[3], ~a[3]) and 10 < a[3].sum() < 40


def test_whitening_layer_whitens_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, 2, bias=False)
    images = torch.from_numpy(random_images(64, 5)).permute(0, 3, 1, 2).contiguous()
    train.init_whitening(conv, images, eps=0)
    out = conv(cifar10.normalize(images)).detach()[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = out.T @ out / len(out)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=1e-3)


def test_evaluate_tta_levels_and_rank_shares():
    torch.manual_seed(0)
    model = models.tiny(models.layers("native"), 4)
    x = torch.from_numpy(random_images(10, 3)).permute(0, 3, 1, 2).contiguous()
    y = torch.arange(10) % 10
    with torch.no_grad():
        z = cifar10.normalize(x)
        padded = F.pad(z, (1, 1, 1, 1), mode="reflect")
        mirror = lambda v: (model(v) + model(v.flip(3))) / 2  # noqa: E731
        expected = {0: model(z), 1: mirror(z),
                    2: mirror(z) / 2 + (mirror(padded[:, :, :32, :32]) + mirror(padded[:, :, 2:, 2:])) / 4}
    for level, logits in expected.items():
        loss, correct, n = train.evaluate(model, x, y, level, batch=4)
        assert n == 10 and int(correct) == int((logits.argmax(1) == y).sum())
        assert abs(float(loss) - F.cross_entropy(logits, y, reduction="sum").item()) < 1e-4
        shares = [train.evaluate(model, x, y, level, world=3, rank=r) for r in range(3)]
        assert sum(s[2] for s in shares) == 10 and abs(sum(float(s[0]) for s in shares) - float(loss)) < 1e-4
    assert not torch.allclose(expected[1], expected[2])


# ------------------------------------------------------------------------------- models

def test_models_native_and_manual_are_identical():
    data = dict(train_x=torch.from_numpy(random_images(16, 2)).permute(0, 3, 1, 2).contiguous(), classes=list("abcdefghij"))
    x = torch.randn(4, 3, 32, 32)
    # ResNet-20 with option-A shortcuts: 267,696 conv + 1,376 batch-norm + 650 linear parameters
    # (He et al.'s "0.27M"; option B's 1x1 projections would add 2,752)
    for argv, counts in ((AIRBENCH, None), (TINY, None), (["--model", "resnet20"], 269722)):
        built = {}
        for backend in ("manual", "native"):
            args = train.parse_args(argv + ["--backend", backend])
            built[backend] = train.build_model(args, data, seed=3)
        manual, native = built["manual"], built["native"]
        assert all(type(m) in (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d) for m in native.modules()
                   if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)))
        convs = [m for m in manual.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(isinstance(m, manualconv.Conv2d) for m in convs)
        assert [k for k, _ in manual.named_parameters()] == [k for k, _ in native.named_parameters()]
        for (k, a), b in zip(manual.state_dict().items(), native.state_dict().values()):
            assert torch.equal(a, b), k
        if counts:
            assert sum(p.numel() for p in native.parameters()) == counts
        manual.eval(), native.eval()
        assert manual(x).shape == (4, 10)
        assert torch.allclose(manual(x), native(x), atol=1e-5)


@pytest.mark.parametrize("argv", [AIRBENCH, ["--model", "resnet20"], ["--model", "lenet5"]],
                         ids=["airbench", "resnet20", "lenet5"])
def test_manual_backend_hand_derives_every_layer(argv):
    """train.py --backend manual: the backward graph of forward + train.py's loss holds only
    manualconv Functions and tensor glue (the F.relu calls inside manualconv.models' forwards are
    captured like a user's: they once ran as torch's ReluBackward0)."""
    from manualconv.verify import native_backward_nodes

    data = dict(train_x=torch.from_numpy(random_images(16, 2)).permute(0, 3, 1, 2).contiguous(), classes=list("abcdefghij"))
    args = train.parse_args(argv + ["--backend", "manual"])
    model = train.build_model(args, data, seed=3).train()
    logits = model(torch.randn(4, 3, 32, 32))
    loss = manualconv.CrossEntropyLoss(label_smoothing=0.2, reduction="sum")(logits, torch.tensor([0, 1, 2, 3]))
    assert native_backward_nodes(loss) == []


@pytest.mark.parametrize("model", [AIRBENCH, ["--model", "lenet5", "--batch-size", "8", "--threads", "1",
                                               "--quiet", "--no-download"]], ids=["airbench", "lenet5"])
def test_native_and_manual_first_batch_loss_match(folder_data, tmp_path, model):
    root, _ = folder_data
    results = {}
    for backend in ("manual", "native"):
        m, summary, _ = train.main(model + ["--data-dir", root, "--epochs", "1", "--backend", backend,
                                            "--out", str(tmp_path / backend)])
        results[backend] = summary
        convs = [type(c) for c in m.modules() if isinstance(c, nn.Conv2d)]
        assert convs and all((c is nn.Conv2d) == (backend == "native") for c in convs)
    assert results["manual"]["init_sha256"] == results["native"]["init_sha256"]
    assert abs(results["manual"]["first_batch_loss"] - results["native"]["first_batch_loss"]) < 1e-5
    assert results["manual"]["first_batch_loss"] > 0.5


# --------------------------------------------------------------------------- end to end

def test_cli_end_to_end_folder_layout(folder_data, tmp_path):
    root, _ = folder_data
    out = tmp_path / "run"
    proc = run_cli(*TINY, "--data-dir", root, "--epochs", "2", "--out", str(out), "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    assert "final test accuracy" in proc.stdout and "images/s" in proc.stdout
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0 <= float(r["test_acc"]) <= 100 and float(r["train_loss"]) > 0 for r in rows)
    summary = json.load(open(out / "metrics.json"))
    assert summary["completed_epochs"] == 2 and len(summary["epochs"]) == 2 and "test_acc_tta" in summary
    assert open(out / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and set(ckpt["rng"]) >= {"torch", "numpy", "python"} and "optimizer" in ckpt


def test_cli_end_to_end_pickled_batches(batches_data, tmp_path):
    root, _ = batches_data
    model, summary, history = train.main(TINY + ["--data-dir", root, "--epochs", "1", "--out", str(tmp_path)])
    assert summary["completed_epochs"] == 1 and os.path.isfile(tmp_path / "curves.png")
    assert summary["train_images_per_s"] > 0 and summary["wall_time_s"] > 0


def test_end_to_end_jpeg_folder(tmp_path, capsys):
    root = str(tmp_path / "jpeg")
    written = write_folder(root, n_train=6, n_test=3, ext="jpg")
    _, summary, history = train.main(TINY + ["--data-dir", root, "--epochs", "2", "--out", str(tmp_path / "o")])
    assert "18 training images, 9 test" in capsys.readouterr().out
    assert summary["completed_epochs"] == 2 and len(history) == 2
    data = cifar10.load_cifar10(root, download=False, log=lambda *a: None)
    decoded = data["train_x"].permute(0, 2, 3, 1).float()
    assert (decoded - torch.from_numpy(written["train"][0]).float()).abs().mean() < 8  # JPEG quality 95


def test_resume_matches_uninterrupted_run(folder_data, tmp_path):
    root, _ = folder_data
    # batch 4: 6 steps an epoch, so the lookahead average (every 5 steps) is part of the checkpoint
    common = AIRBENCH + ["--data-dir", root, "--epochs", "3", "--seed", "11", "--whiten-bias-epochs", "1",
                         "--batch-size", "4"]
    full_model, full, full_hist = train.main(common + ["--out", str(tmp_path / "full")])
    _, part, _ = train.main(common + ["--out", str(tmp_path / "part"), "--stop-after", "1"])
    assert part["completed_epochs"] == 1
    resumed_model, resumed, resumed_hist = train.main(common + ["--out", str(tmp_path / "part"), "--resume", "auto"])
    assert resumed["completed_epochs"] == 3
    timing = {"epoch_time_s", "train_images_per_s"}
    strip = lambda hist: [{k: v for k, v in h.items() if k not in timing} for h in hist]  # noqa: E731
    assert strip(resumed_hist) == strip(full_hist)
    assert resumed["test_acc"] == full["test_acc"] and resumed["test_loss"] == full["test_loss"]
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k]), k
    assert len(list(csv.DictReader(open(tmp_path / "part" / "metrics.csv")))) == 3
    with pytest.raises(SystemExit, match="was trained with --width"):  # a checkpoint of another model
        train.main(common + ["--width", "4,8,16", "--resume", str(tmp_path / "part" / "checkpoint.pt")])
    # and training did move the weights
    assert not torch.equal(full_model[2].conv1.weight, train.build_model(
        train.parse_args(common), cifar10.load_cifar10(root, log=lambda *a: None), 11)[2].conv1.weight)


# -------------------------------------------------------------------------- distributed

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_equal_single_process(folder_data, tmp_path):
    """A batch-norm-free model: two ranks, each with half of every global batch of 8, average their
    gradients, which is the single process's mean gradient up to the order of float additions
    (the two half-batch sums are added by the all-reduce, not inside one GEMM): equal within 1e-6."""
    root, _ = folder_data
    argv = TINY + ["--data-dir", root, "--epochs", "2", "--lr", "0.2"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           TRAIN_PY, *argv, "--out", str(tmp_path / "ddp")],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final test accuracy") == 1  # only rank 0 logs
    assert "(2 ranks)" in proc.stdout
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    single_model, single, _ = train.main(argv + ["--out", str(tmp_path / "single")])
    initial = train.build_model(train.parse_args(argv), cifar10.load_cifar10(root, log=lambda *a: None), 0)
    assert json.load(open(tmp_path / "ddp" / "metrics.json"))["world_size"] == 2
    for name, p in single_model.named_parameters():
        assert torch.allclose(ddp["model"][name], p, rtol=0, atol=1e-6), name
        assert (p - initial.state_dict()[name]).abs().max() > 1e-3, name  # the runs did train


def _rank_worker(rank, port, argv, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    model, _, _ = train.main(argv)
    torch.save({k: v for k, v in model.named_parameters()}, os.path.join(out, f"rank{rank}.pt"))


def test_batchnorm_model_parameters_identical_across_ranks(folder_data, tmp_path):
    root, _ = folder_data
    argv = AIRBENCH + ["--data-dir", root, "--epochs", "1", "--lr", "0.5", "--out", str(tmp_path / "run")]
    torch.multiprocessing.spawn(_rank_worker, args=(free_port(), argv, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    initial = train.build_model(train.parse_args(argv), cifar10.load_cifar10(root, log=lambda *a: None), 0)
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 10
    for name, p in initial.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        if p.requires_grad:  # trained, each rank on its half of every batch
            assert (ranks[0][name] - p).abs().max() > 1e-4, name


# ------------------------------------------------------------------------------- errors

def test_missing_and_empty_data_dir(tmp_path):
    for path in (tmp_path / "absent", tmp_path / "empty"):
        if path.name == "empty":
            path.mkdir()
        proc = run_cli(*TINY, "--data-dir", str(path), "--out", str(tmp_path / "o"))
        assert proc.returncode == 1
        assert str(path) in proc.stderr and "tar -xzf" in proc.stderr and "cifar-10-batches-py" in proc.stderr
        assert ("does not exist" if path.name == "absent" else "is empty") in proc.stderr
        assert "Traceback" not in proc.stderr


def corrupt_cases(tmp):
    """(data dir, text the error must contain) for each kind of broken data directory."""
    batches = os.path.join(tmp, "bad_pickle", "cifar-10-batches-py")
    write_batches(batches)
    with open(os.path.join(batches, "data_batch_3"), "wb") as f:
        f.write(b"this is not a pickle")
    partial = os.path.join(tmp, "partial", "cifar-10-batches-py")
    write_batches(partial)
    os.remove(os.path.join(partial, "test_batch"))
    bad_image = os.path.join(tmp, "bad_image")
    write_folder(bad_image, 2, 2, "jpg")
    with open(os.path.join(bad_image, "train", "dog", "0001.jpg"), "wb") as f:
        f.write(b"\xff\xd8 truncated")
    no_test = os.path.join(tmp, "no_test")
    write_folder(no_test, 2, 1)
    for name in CLASSES:
        for f in os.listdir(os.path.join(no_test, "test", name)):
            os.remove(os.path.join(no_test, "test", name, f))
    big = os.path.join(tmp, "big", "train", "a")
    os.makedirs(big)
    os.makedirs(os.path.join(tmp, "big", "test", "a"))
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(os.path.join(big, "x.png"))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(os.path.join(tmp, "big", "test", "a", "x.png"))
    unknown = os.path.join(tmp, "unknown")
    os.makedirs(unknown)
    open(os.path.join(unknown, "cifar10-jpeg.tar.gz"), "wb").close()
    return [(os.path.dirname(batches), os.path.join(batches, "data_batch_3")),
            (os.path.dirname(partial), "missing test_batch"),
            (bad_image, os.path.join(bad_image, "train", "dog", "0001.jpg")),
            (no_test, "no images"),
            (os.path.join(tmp, "big"), "expected a 32x32 image"),
            (unknown, "extract it first")]


def test_corrupt_data_dirs_give_clear_errors(tmp_path, capsys):
    for path, expected in corrupt_cases(str(tmp_path)):
        with pytest.raises(SystemExit) as exit_info:
            train.main(TINY + ["--data-dir", path, "--out", str(tmp_path / "o")])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert expected in err and path in err, (path, err)


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "-1"], "--epochs: must be positive"),
    (["--epochs", "0"], "--epochs: must be positive"),
    (["--batch-size", "0"], "--batch-size: must be positive"),
    (["--limit", "0"], "--limit: must be positive"),
    (["--model", "vgg"], "invalid choice: 'vgg'"),
    (["--resume", "/nonexistent/checkpoint.pt"], "no such checkpoint file"),
    (["--model", "airbench", "--width", "8,8"], "three positive integer"),
    (["--lr", "abc"], "--lr: invalid"),
    (["--backend", "native", "--conv-backend", "cpp"], "needs --backend manual"),
    (["--backend", "native", "--plot-grads"], "needs --backend manual"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_argument_exit_code_from_cli():
    proc = run_cli("--batch-size", "0")
    assert proc.returncode == 2 and "--batch-size: must be positive" in proc.stderr


def test_plot_grads_records_every_step(folder_data, tmp_path):
    """--plot-grads: grads.csv holds one delta norm per manualconv layer per step, equal in count
    to the steps taken, and grads.png is written."""
    root, _ = folder_data
    out = str(tmp_path / "run")
    train.main(TINY + ["--data-dir", root, "--epochs", "2", "--out", out, "--plot-grads"])
    with open(os.path.join(out, "grads.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(out, "metrics.json")) as f:
        history = json.load(f)["epochs"]
    steps = {int(r["step"]) for r in rows}
    deltas = {r["name"] for r in rows if r["kind"] == "delta"}
    assert deltas and all(float(r["norm"]) > 0 for r in rows if r["kind"] == "delta")
    assert len(history) == 2 and len(steps) >= 2 and max(steps) == len(steps) - 1
    assert os.path.getsize(os.path.join(out, "grads.png")) > 0


# ------------------------------------------------------------- resume, --out and --amp errors

@pytest.fixture(scope="module")
def checkpoint(folder_data, tmp_path_factory):
    """(arguments, checkpoint.pt) of a tiny run stopped after epoch 1 of 2 (written by a separate
    process, so this module-scoped fixture leaves this process's torch state alone)."""
    root, _ = folder_data
    out = tmp_path_factory.mktemp("stopped")
    argv = TINY + ["--data-dir", root, "--epochs", "2"]
    proc = run_cli(*argv, "--out", str(out), "--stop-after", "1")
    assert proc.returncode == 0, proc.stderr
    return argv, str(out / "checkpoint.pt")


def broken_checkpoint(kind, good, path):
    """Writes a checkpoint.pt that cannot be resumed from at path."""
    if kind == "truncated":
        data = open(good, "rb").read()
        data = data[:len(data) // 2]
    elif kind == "random-bytes":
        data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    elif kind == "empty":
        data = b""
    else:  # torch files that are no checkpoint: a tensor, a dict of other keys, a checkpoint missing a key
        value = {"tensor": torch.ones(3), "other-dict": {"weights": torch.ones(3)},
                 "missing-key": {k: v for k, v in torch.load(good, weights_only=False).items() if k != "step"}}[kind]
        torch.save(value, path)
        return
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("via", ["path", "auto"])
@pytest.mark.parametrize("kind", ["truncated", "random-bytes", "empty", "tensor", "other-dict", "missing-key"])
def test_resume_of_broken_checkpoint_is_a_usage_error(checkpoint, tmp_path, capsys, kind, via):
    argv, good = checkpoint
    out = tmp_path / "run"
    out.mkdir()
    path = str(out / "checkpoint.pt")
    broken_checkpoint(kind, good, path)
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv + ["--out", str(out), "--resume", path if via == "path" else "auto"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"train.py: error: --resume {path}: " in err, err
    assert ("not a train.py checkpoint" if kind in ("tensor", "other-dict", "missing-key")
            else "cannot read it") in err, err
    if kind == "missing-key":
        assert "missing step" in err, err


def test_resume_of_truncated_checkpoint_from_cli(checkpoint, tmp_path):
    argv, good = checkpoint
    broken_checkpoint("truncated", good, str(tmp_path / "checkpoint.pt"))
    proc = run_cli(*argv, "--out", str(tmp_path), "--resume", "auto")
    assert proc.returncode == 2, proc.stderr
    assert "train.py: error: --resume" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_out_must_be_a_folder(tmp_path, capsys):
    existing = tmp_path / "metrics.txt"
    existing.write_text("not a folder")
    for out, culprit in ((existing, existing), (existing / "run", existing), (existing / "a" / "b", existing)):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(TINY + ["--out", str(out)])
        assert exit_info.value.code == 2
        assert f"--out {out}: {culprit} is a file, not a folder" in capsys.readouterr().err


def test_resume_with_other_data_or_schedule_is_refused(checkpoint, tmp_path, capsys):
    argv, good = checkpoint
    out = tmp_path / "run"
    out.mkdir()
    path = str(out / "checkpoint.pt")
    with open(good, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    cases = [(["--limit", "12"], ["--limit unset (now 12)"]),
             (["--lr", "0.2", "--seed", "3"], ["--lr 0.05 (now 0.2)", "--seed 0 (now 3)"]),
             (["--epochs", "3"], ["--epochs 2 (now 3)"]),
             (["--amp"], ["--amp: float32 (now bfloat16)"])]
    for extra, named in cases:
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv + extra + ["--out", str(out), "--resume", "auto"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"train.py: error: --resume {path}: " in err and "--resume-override" in err, err
        assert all(text in err for text in named), err
        assert open(path, "rb").read() == open(good, "rb").read()  # refused before anything was written
    # arguments that change neither the data nor the schedule may differ
    _, summary, history = train.main(argv + ["--out", str(out), "--resume", path, "--threads", "1", "--workers", "1"])
    assert summary["completed_epochs"] == 2 and len(history) == 2


def test_resume_override_continues_with_new_arguments(checkpoint, tmp_path, capsys):
    argv, good = checkpoint
    out = tmp_path / "run"
    out.mkdir()
    path = str(out / "checkpoint.pt")
    with open(good, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    _, summary, history = train.main(argv + ["--limit", "12", "--out", str(out), "--resume", "auto",
                                             "--resume-override"])
    logged = capsys.readouterr().out
    assert "--limit unset (now 12)" in logged and "12 training images" in logged, logged
    assert summary["completed_epochs"] == 2 and summary["args"]["limit"] == 12 and len(history) == 2
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "--resume-override" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["native", "manual"])
def test_amp_trains_in_bfloat16_on_cpu(folder_data, tmp_path, monkeypatch, backend):
    """--amp on CPU: every convolution computes in bfloat16 (autocast), parameters and checkpoint
    stay float32, and the first batch's loss is the float32 run's up to bfloat16 rounding."""
    root, _ = folder_data
    dtypes, build = set(), train.build_model

    def build_recording(*args, **kwargs):
        model = build(*args, **kwargs)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
        return model

    monkeypatch.setattr(train, "build_model", build_recording)
    argv = AIRBENCH + ["--data-dir", root, "--epochs", "1", "--backend", backend]
    _, amp, _ = train.main(argv + ["--amp", "--out", str(tmp_path / "amp")])
    assert dtypes == {torch.bfloat16} and amp["precision"] == "bfloat16"
    dtypes.clear()
    _, full, _ = train.main(argv + ["--out", str(tmp_path / "float32")])
    assert dtypes == {torch.float32} and full["precision"] == "float32"
    ckpt = torch.load(tmp_path / "amp" / "checkpoint.pt", weights_only=False)
    assert ckpt["precision"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    # bfloat16 keeps 8 significant bits (relative rounding <= 2^-9 per value): through airbench's
    # eight convolutions the first loss moves, by far less than 1%
    assert 0 < abs(amp["first_batch_loss"] - full["first_batch_loss"]) < 0.01 * full["first_batch_loss"]


def test_cpp_kernels_are_chosen_wherever_the_extension_has_them():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train.choose_conv_backend(None, cpu)[0] == "cpp" and train.has_kernels(cpu)
    assert train.choose_conv_backend("reference", cpu)[0] == "reference"
    ops = [name for name in torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
           if name.startswith("manualconv::")]
    built_with_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("manualconv::conv2d_forward", "CUDA")
    assert train.has_kernels(cuda) == built_with_cuda and len(ops) >= 10
    if not built_with_cuda:  # this build: the reference kernels on CUDA, saying why; --conv-backend cpp refused
        backend, why = train.choose_conv_backend(None, cuda)
        assert backend == "reference" and "without CUDA kernels" in why
        with pytest.raises(SystemExit, match="--conv-backend cpp: the C.. extension was built without CUDA"):
            train.choose_conv_backend("cpp", cuda)
        # a build with CUDA kernels, mimicked by registering (never called) ones for this test: cpp;
        # one operator without its CUDA kernel is enough to fall back
        lib = torch.library.Library("manualconv", "IMPL")
        try:
            for name in ops[:-1]:
                lib.impl(name.split("::")[1], lambda *args: None, "CUDA")
            assert train.choose_conv_backend(None, cuda)[0] == "reference"
            lib.impl(ops[-1].split("::")[1], lambda *args: None, "CUDA")
            assert train.choose_conv_backend(None, cuda) == ("cpp", "the C++ extension's CUDA kernels")
        finally:
            lib._destroy()
        assert not train.has_kernels(cuda)
    # float16 autocast with loss scaling on CUDA, bfloat16 on CPU
    assert train.autocast_dtype(True, cuda) == torch.float16 and train.autocast_dtype(True, cpu) == torch.bfloat16
    assert train.autocast_dtype(False, cuda) is None


def test_resume_of_checkpoint_written_before_amp(checkpoint, tmp_path, capsys):
    """A checkpoint without the keys --amp added (loss scaler, precision) resumes in float32, and
    refuses --amp like any other change of schedule."""
    argv, good = checkpoint
    path = str(tmp_path / "checkpoint.pt")
    old = {k: v for k, v in torch.load(good, weights_only=False).items() if k not in ("scaler", "precision")}
    old["args"] = {k: v for k, v in old["args"].items() if k not in ("amp", "resume_override")}
    torch.save(old, path)
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv + ["--out", str(tmp_path), "--resume", "auto", "--amp"])
    assert exit_info.value.code == 2 and "--amp: float32 (now bfloat16)" in capsys.readouterr().err
    _, summary, history = train.main(argv + ["--out", str(tmp_path), "--resume", "auto"])
    assert summary["completed_epochs"] == 2 and summary["precision"] == "float32" and len(history) == 2
