"""CIFAR-10 for train.py: loading (torchvision's pickled batches or an ImageFolder tree of JPEG/PNG
files, decoded once and cached as uint8 tensors) and batched augmentation on the device (random
crops of the padded image, alternating horizontal flips, normalisation), planned per epoch from
a generator seeded by (seed, epoch).

    data = load_cifar10("./data")                   # dict: train_x, train_y, test_x, test_y, classes
    order, dy, dx, flip = epoch_plan(len(data["train_x"]), epoch, seed, pad=2)  # dy, dx, flip: per image
    batch = order[:512]
    x = augment(data["train_x"][batch], dy[batch], dx[batch], flip[batch], 2, "reflect")
"""

from __future__ import annotations

import glob
import hashlib
import os
import pickle
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
CACHE_NAME = ".manualconv_cache.pt"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
EXPECTED = ("Point --data-dir at an existing copy of CIFAR-10, in one of these layouts:\n"
            "  DIR/cifar-10-batches-py/{data_batch_1..5,test_batch}  (torchvision's download), or that folder\n"
            "  DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg       (ImageFolder layout)\n"
            "for example the offline JPEG archive:\n"
            "  mkdir -p DIR && tar -xzf ../shared/data/cifar10/cifar10-jpeg.tar.gz -C DIR\n"
            "  python train.py --data-dir DIR")


class DataError(Exception):
    """The data directory is missing, empty, of an unknown layout or corrupt."""


def detect_layout(root):
    """('batches', folder) | ('folder', root) | None."""
    for folder in (os.path.join(root, "cifar-10-batches-py"), root):
        if any(os.path.exists(os.path.join(folder, name)) for name in BATCH_FILES):
            return "batches", folder
    if os.path.isdir(os.path.join(root, "train")) or os.path.isdir(os.path.join(root, "test")):
        return "folder", root
    return None


def load_batches(folder):
    """The pickled python-version batches: dicts with 'data' (N x 3072 uint8) and 'labels'."""
    missing = [name for name in BATCH_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)} (expected data_batch_1..5 and test_batch)")
    parts = {}
    for name in BATCH_FILES:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            entry = {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
            if labels.shape != (len(data),) or labels.min() < 0 or labels.max() > 9:
                raise ValueError(f"{labels.size} labels in 0..9 expected for {len(data)} images")
        except Exception as error:  # unpickling, missing keys, wrong sizes: all mean a corrupt file
            raise DataError(f"corrupt CIFAR-10 batch file {path}: {type(error).__name__}: {error}") from None
        parts[name] = (torch.from_numpy(data.copy()), torch.from_numpy(labels))
    train = [parts[name] for name in BATCH_FILES[:-1]]
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return dict(train_x=torch.cat([x for x, _ in train]), train_y=torch.cat([y for _, y in train]),
                test_x=parts["test_batch"][0], test_y=parts["test_batch"][1], classes=classes)


def list_folder(root):
    """{split: [(path, label)]} and the class names of an ImageFolder-layout tree."""
    splits, classes = {}, None
    for split in ("train", "test"):
        base = os.path.join(root, split)
        names = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))) \
            if os.path.isdir(base) else []
        if not names:
            raise DataError(f"{base}: expected class folders ({split}/<class>/*.jpg), found none")
        if classes is not None and names != classes:
            raise DataError(f"{root}: train/ and test/ hold different class folders: {classes} vs {names}")
        classes = names
        items = [(path, label) for label, name in enumerate(names)
                 for path in sorted(glob.glob(os.path.join(base, name, "*"))) if path.lower().endswith(IMAGE_EXTS)]
        if not items:
            raise DataError(f"{base}: no images (*.jpg, *.png) in its class folders")
        splits[split] = items
    return splits, classes


def decode_all(items, workers):
    try:  # torchvision's decoder is ~5x faster than PIL's (deprecated in favour of TorchCodec)
        from torchvision.io import ImageReadMode, decode_image, read_file

        def read(path):
            return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except ImportError:
        from PIL import Image

        def read(path):
            with Image.open(path) as image:
                return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)

    def decode(chunk):
        out = torch.empty(len(chunk), 3, 32, 32, dtype=torch.uint8)
        for i, (path, _) in enumerate(chunk):
            try:
                image = read(path)
            except Exception as error:
                raise DataError(f"cannot decode image {path}: {error}") from None
            if image.shape != (3, 32, 32):
                raise DataError(f"{path}: expected a 32x32 image, got {tuple(image.shape[1:])}")
            out[i] = image
        return out

    chunks = [items[i:i + 1000] for i in range(0, len(items), 1000)]
    with warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool:
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        images = torch.cat(list(pool.map(decode, chunks)))
    return images, torch.tensor([label for _, label in items], dtype=torch.int64)


def load_folder(root, workers, log):
    splits, classes = list_folder(root)
    # the cache key: every file's name, size and modification time
    digest = hashlib.sha1()
    for path, label in splits["train"] + splits["test"]:
        st = os.stat(path)
        digest.update(f"{os.path.relpath(path, root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    key, cache = digest.hexdigest(), os.path.join(root, CACHE_NAME)
    if os.path.isfile(cache):
        try:
            data = torch.load(cache, weights_only=True)
            if data.get("key") == key:
                log(f"data: {cache} (decoded cache)")
                return data
        except Exception:  # a stale or broken cache is simply rebuilt
            pass
    start = time.time()
    train_x, train_y = decode_all(splits["train"], workers)
    test_x, test_y = decode_all(splits["test"], workers)
    data = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=classes, key=key)
    log(f"data: decoded {len(train_x) + len(test_x)} images from {root} in {time.time() - start:.1f}s")
    try:
        torch.save(data, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    except OSError as error:
        log(f"data: not caching the decoded images ({error.strerror}: {cache})")
    return data


def load_cifar10(root, workers=4, download=True, log=print):
    """The whole data set as uint8 tensors N x 3 x 32 x 32 and int64 labels."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"--data-dir {root} is a file, not a directory.\n{EXPECTED}")
    layout = detect_layout(root) if os.path.isdir(root) else None
    if layout is None:
        present = os.path.isdir(root) and os.listdir(root)
        if present:
            archives = glob.glob(os.path.join(root, "*.tar.gz"))
            hint = f"\n(found {archives[0]}: extract it first, see below)" if archives else ""
            raise DataError(f"{root} holds no CIFAR-10 data in a known layout{hint}\n{EXPECTED}")
        state = "is empty" if os.path.isdir(root) else "does not exist"
        if not download:
            raise DataError(f"data directory {root} {state} (and --no-download was given).\n{EXPECTED}")
        log(f"data: {root} {state}; downloading CIFAR-10 with torchvision")
        try:
            import torchvision
            torchvision.datasets.CIFAR10(root, train=True, download=True)
        except Exception as error:
            raise DataError(f"data directory {root} {state} and downloading CIFAR-10 failed "
                            f"({type(error).__name__}: {error}).\n{EXPECTED}") from None
        layout = detect_layout(root)
    kind, folder = layout
    if kind == "batches":
        log(f"data: {folder} (pickled batches)")
        data = load_batches(folder)
    else:
        data = load_folder(folder, workers, log)
    if len(data["classes"]) < 2:
        raise DataError(f"{root}: need at least 2 classes, found {data['classes']}")
    return data


def normalize(x_uint8):
    zero = torch.zeros(len(x_uint8), dtype=torch.long, device=x_uint8.device)
    return augment(x_uint8, zero, zero, zero.bool(), 0, "reflect")


def augment(x_uint8, dy, dx, flip, pad, pad_mode):
    """Batched random crop (offsets dy, dx in 0..2*pad of the padded image), horizontal flip and
    normalisation; 'zeros' pads with black pixels."""
    x = x_uint8.float()
    if pad > 0:
        n, c, h, w = x.shape
        x = F.pad(x, (pad,) * 4, mode="reflect" if pad_mode == "reflect" else "constant")
        ar = lambda k: torch.arange(k, device=x.device)
        x = x[ar(n)[:, None, None, None], ar(c)[None, :, None, None],
              (dy[:, None] + ar(h))[:, None, :, None], (dx[:, None] + ar(w))[:, None, None, :]]
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    mean = torch.tensor(CIFAR_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    return (x - mean) / (torch.tensor(CIFAR_STD, device=x.device).view(1, 3, 1, 1) * 255)


def epoch_plan(n, epoch, seed, pad):
    """The order and augmentation of one epoch, from a generator seeded by (seed, epoch): the same
    on every rank and after a resume. Flips alternate (airbench): an image flipped in one epoch is
    not in the next, and each image's first choice is random."""
    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=gen)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=gen)
    base = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed + 7)).bool()
    return order, dy, dx, base ^ bool(epoch % 2)


def take_train_subset(data, n, seed):
    """The data with its training set cut to n images drawn at random from a generator seeded by
    seed (the same n and seed give the same images)."""
    keep = torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(seed))[:n]
    return dict(data, train_x=data["train_x"][keep], train_y=data["train_y"][keep])
