"""Raw image sources, chosen by name: each loader returns every labelled image it has.

Splitting, class selection and capping happen later (``split.py``, ``prepared.py``);
a source only turns files into one uint8 ``[N, C, H, W]`` array (or, for an image
folder, ``ImageFiles``: the files, decoded only when the images are taken) and int64 labels.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from transferlab.errors import DataError
from transferlab.registry import Registry

__all__ = [
    "DataError",
    "IMAGE_EXTENSIONS",
    "ImageFiles",
    "SPLITS",
    "Progress",
    "allocate_images",
    "decode_image",
    "decode_images",
    "folder_fingerprint",
    "RawDataset",
    "SOURCES",
    "list_sources",
    "load_source",
    "read_image_folder",
    "register_source",
    "source_class_names",
]


SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageFiles:
    """Image files seen as a uint8 ``[N, C, size, size]`` array that is decoded only when taken:
    indexing gives the files of a subset (nothing decoded), ``np.asarray`` decodes them
    (``decode_images``: in parallel, every unreadable file named in one error)."""

    folder: Path  # named in errors
    files: np.ndarray  # object array of Path, [N]
    size: int
    channels: int
    dtype = np.dtype(np.uint8)
    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self.files), self.channels, self.size, self.size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: np.ndarray) -> ImageFiles:
        return replace(self, files=self.files[np.asarray(index)])

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        return decode_images(self.files, size=self.size, channels=self.channels, folder=self.folder)


@dataclass
class RawDataset:
    images: np.ndarray | ImageFiles  # uint8, [N, C, H, W], C in {1, 3}
    labels: np.ndarray  # int64, [N], values index class_names
    class_names: list[str]
    source: str | None = None  # registry name, filled in by load_source (for meta)
    # The source's own split of each image ('train', 'val' or 'test'; an image folder with
    # train/ and val/ subfolders), or None: prepare then splits by data.val_fraction/test_fraction.
    splits: np.ndarray | None = None

    def __post_init__(self) -> None:
        images, labels = self.images, np.asarray(self.labels)
        if not isinstance(images, (np.ndarray, ImageFiles)) or images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(
                "RawDataset.images must be a uint8 numpy array [N, C, H, W]; got "
                f"{type(images).__name__} dtype={getattr(images, 'dtype', None)} "
                f"shape={getattr(images, 'shape', None)}"
            )
        if images.shape[1] not in (1, 3):
            raise DataError(f"RawDataset.images has {images.shape[1]} channels; expected 1 or 3")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"RawDataset.labels must have shape [{images.shape[0]}]; got {labels.shape}"
            )
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"RawDataset.labels must be integers; got dtype {labels.dtype}")
        self.labels = labels.astype(np.int64, copy=False)
        self.class_names = [str(name) for name in self.class_names]
        if self.labels.size and (
            self.labels.min() < 0 or self.labels.max() >= len(self.class_names)
        ):
            raise DataError(
                f"RawDataset.labels range {self.labels.min()}..{self.labels.max()} does not "
                f"index the {len(self.class_names)} class names {self.class_names}"
            )
        if self.splits is not None:
            self.splits = np.asarray(self.splits)
            if self.splits.shape != self.labels.shape or not np.isin(self.splits, SPLITS).all():
                raise DataError(f"RawDataset.splits must name one of {list(SPLITS)} per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, index: np.ndarray) -> RawDataset:
        """The images at ``index`` (integer indices or a boolean mask), undecoded if they were."""
        return replace(self, images=self.images[index], labels=self.labels[index],
                       splits=None if self.splits is None else self.splits[index])


# Every loader gets the same keyword arguments so load_source can stay generic;
# loaders may ignore the ones that do not concern them.
# info: class_names(root=, path=) -> the source's class names, known without decoding an image.
SourceLoader = Callable[..., RawDataset]
SOURCES: Registry[SourceLoader] = Registry("data.source", what="data source", error=DataError)
register_source = SOURCES.register


def list_sources() -> list[str]:
    return SOURCES.names()


def load_source(
    name: str,
    *,
    root: str | Path,
    path: str | Path | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    download: bool = True,
) -> RawDataset:
    """Load every labelled image of source ``name``, optionally resized/recoloured.

    ``root`` is where downloadable datasets live; ``path`` is the folder for
    ``imagefolder``. ``image_size`` gives square ``image_size x image_size``
    images (an image folder's are resized keeping their aspect ratio, the shorter
    side to ``image_size``, then centre-cropped); ``channels`` (1 or 3) converts
    grey <-> RGB. An image folder's images are ``ImageFiles``, decoded when taken.
    """
    loader = SOURCES[name].build
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise DataError(f"image_size must be a positive integer or None; got {image_size!r}")
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1, 3 or None; got {channels!r}")
    raw = loader(
        root=Path(root),
        path=None if path is None else Path(path),
        image_size=image_size,
        channels=channels,
        download=download,
    )
    images = raw.images
    if channels is not None and images.shape[1] != channels:
        images = convert_channels(images, channels)
    if image_size is not None and images.shape[2:] != (image_size, image_size):
        images = resize_images(images, image_size)
    return replace(raw, images=images, source=name)


def source_class_names(name: str, *, root: str | Path = "data/raw", path: str | Path | None = None) -> list[str]:
    """The class names ``load_source(name, ...)`` would give, from metadata or a folder listing:
    checks that need them (unknown classes, head sizes) run before any work."""
    return list(SOURCES[name].info["class_names"](root=Path(root), path=None if path is None else Path(path)))


# --------------------------------------------------------------------------- conversions

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_CHUNK = 2048  # images per chunk: bounds the float copies of big datasets


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 NCHW 1 <-> 3 channels: grey is repeated, RGB goes through ITU-R 601 luma."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=1)
    if have == 3 and channels == 1:
        out = allocate_images(images.shape[0], 1, *images.shape[2:])
        for start in range(0, images.shape[0], _CHUNK):
            chunk = images[start : start + _CHUNK].astype(np.float32)
            grey = np.tensordot(_LUMA, chunk, axes=([0], [1]))  # [n, H, W]
            out[start : start + _CHUNK, 0] = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return out
    raise DataError(f"Cannot convert {have} channels to {channels}; only 1 <-> 3 is supported")


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 NCHW to ``size x size``; antialiased so shrinking doesn't alias."""
    n, c = images.shape[:2]
    out = allocate_images(n, c, size, size)
    for start in range(0, n, _CHUNK):
        chunk = torch.from_numpy(images[start : start + _CHUNK]).float()
        resized = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + _CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


# --------------------------------------------------------------------------- sources


@register_source("digits", class_names=lambda **_: [str(i) for i in range(10)])
def _load_digits(**_: object) -> RawDataset:
    # scikit-learn ships these 1797 8x8 images, so this source works offline and in
    # well under a second: the default for tests and smoke runs.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return RawDataset(
        images=np.ascontiguousarray(images),
        labels=bunch.target.astype(np.int64),
        class_names=[str(name) for name in bunch.target_names],
    )


def _torchvision_classes(name: str) -> list[str]:
    from torchvision import datasets

    return list(getattr(datasets, name).classes)


def _torchvision_hint(cls: type, root: Path) -> str:
    """Where this torchvision dataset class looks for its files, in words."""
    from torchvision import datasets

    if issubclass(cls, datasets.CIFAR10):
        folder = root / cls.base_folder
        files = [entry[0] for entry in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return (
            f"torchvision expects the extracted files {files} in {folder} "
            f"(unpack {cls.filename} from {cls.url} into {root})"
        )
    # MNIST and its look-alikes keep files under <root>/<ClassName>/raw.
    folder = root / cls.__name__ / "raw"
    files = [Path(filename).stem for filename, _md5 in cls.resources]
    return f"torchvision expects the files {files} (or their .gz archives) in {folder}"


def _load_torchvision(name: str, cls: type, root: Path, download: bool) -> RawDataset:
    try:
        parts = [cls(str(root), train=train, download=download) for train in (True, False)]
    except Exception as exc:  # offline download, missing or damaged files: all the same fix
        action = "could not be downloaded" if download else "is not on disk (download=False)"
        reason = " ".join(str(exc).split())  # torchvision's messages span several lines
        raise DataError(
            f"Dataset '{name}' {action} under {root}. {_torchvision_hint(cls, root)}. "
            "Download the files there, or run once with network access and download=True. "
            f"(torchvision said: {type(exc).__name__}: {reason})"
        ) from exc
    images, labels = [], []
    for part in parts:
        data = part.data.numpy() if isinstance(part.data, torch.Tensor) else np.asarray(part.data)
        # MNIST-style data is [N, H, W]; CIFAR is [N, H, W, C].
        data = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
        images.append(np.ascontiguousarray(data, dtype=np.uint8))
        labels.append(np.asarray(part.targets, dtype=np.int64))
    return RawDataset(
        images=np.concatenate(images),
        labels=np.concatenate(labels),
        class_names=list(parts[0].classes),
    )


@register_source("mnist", class_names=lambda **_: _torchvision_classes("MNIST"))
def _load_mnist(*, root: Path, download: bool = True, **_: object) -> RawDataset:
    from torchvision.datasets import MNIST

    return _load_torchvision("mnist", MNIST, root, download)


@register_source("fashion_mnist", class_names=lambda **_: _torchvision_classes("FashionMNIST"))
def _load_fashion_mnist(*, root: Path, download: bool = True, **_: object) -> RawDataset:
    from torchvision.datasets import FashionMNIST

    return _load_torchvision("fashion_mnist", FashionMNIST, root, download)


# CIFAR-10 reads its class names from the downloaded files; these are they.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@register_source("cifar10", class_names=lambda **_: list(CIFAR10_CLASSES))
def _load_cifar10(*, root: Path, download: bool = True, **_: object) -> RawDataset:
    from torchvision.datasets import CIFAR10

    return _load_torchvision("cifar10", CIFAR10, root, download)


def _folder_classes(path: Path | None) -> list[str]:
    if path is None:
        raise DataError("Source 'imagefolder' needs path=<folder with one subfolder per class>")
    return _scan_image_folder(path).class_names


@register_source("imagefolder", class_names=lambda *, path, **_: _folder_classes(path))
def _load_imagefolder(
    *, path: Path | None, image_size: int | None, channels: int | None, **_: object
) -> RawDataset:
    if path is None:
        raise DataError("Source 'imagefolder' needs path=<folder with one subfolder per class>")
    if image_size is None:
        raise DataError(
            f"Source 'imagefolder' needs image_size: the images in {path} can have any size "
            "and are resized (shorter side) and centre-cropped to one square size"
        )
    return read_image_folder(Path(path), image_size=image_size, channels=channels)


# --------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# PIL modes whose pixels carry one intensity; channels=None picks 1 only if all are these.
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})


def _is_grey(mode: str) -> bool:
    return mode in _GREY_MODES or mode.startswith("I;16")


def _visible(entry: Path) -> bool:
    return not entry.name.startswith(".")


@dataclass
class _FolderScan:
    class_names: list[str]
    files: list[Path]
    labels: list[int]
    splits: list[str] | None  # per file, when the folder has train/ and val/ subfolders


def _class_files(folder: Path) -> tuple[list[str], list[list[Path]]]:
    """Sorted class subfolder names of ``folder`` and each one's image files, sorted by name:
    the order never depends on the file system's listing order."""
    class_dirs = sorted((e for e in folder.iterdir() if e.is_dir() and _visible(e)), key=lambda e: e.name)
    return [d.name for d in class_dirs], [
        sorted(e for e in d.iterdir() if _visible(e) and e.is_file() and e.suffix.lower() in IMAGE_EXTENSIONS)
        for d in class_dirs
    ]


def _scan_image_folder(path: Path) -> _FolderScan:
    """Class names (the subfolder names, sorted) and the image files with their labels.

    A folder holding ``train/`` and ``val/`` (and optionally ``test/``) subfolders, each
    with the same class subfolders, brings its own split. Every empty class folder is
    reported in one error, so one fix-and-rerun is enough.
    """
    if not path.is_dir():
        raise DataError(f"Image folder {path} does not exist or is not a directory")
    predefined = (path / "train").is_dir() and (path / "val").is_dir()
    parts = [name for name in SPLITS if (path / name).is_dir()] if predefined else [None]
    if predefined:
        others = sorted(e.name for e in path.iterdir() if e.is_dir() and _visible(e) and e.name not in SPLITS)
        if others:
            raise DataError(f"Image folder {path} has train/ and val/ subfolders (its own split), so every "
                            f"other subfolder is out of place: {others}; move them into train/, val/ or test/")
    scanned = {part: _class_files(path if part is None else path / part) for part in parts}
    class_names = scanned[parts[0]][0]
    for part in parts[1:]:
        names = scanned[part][0]
        if names != class_names:
            raise DataError(
                f"Image folder {path}: the class folders of {path / part} differ from those of "
                f"{path / parts[0]}: only in {part}/: {sorted(set(names) - set(class_names))}, only in "
                f"{parts[0]}/: {sorted(set(class_names) - set(names))}; each split needs the same classes")
    if len(class_names) < 2:
        where = path if parts[0] is None else path / parts[0]
        raise DataError(
            f"Image folder {where} has {len(class_names)} class subfolder(s) "
            f"{class_names}; expected at least 2 (one per class)"
        )
    files: list[Path] = []
    labels: list[int] = []
    splits: list[str] = []
    empty: list[str] = []
    for part in parts:
        for label, (name, found) in enumerate(zip(*scanned[part], strict=True)):
            if not found:
                empty.append(name if part is None else f"{part}/{name}")
            files.extend(found)
            labels.extend([label] * len(found))
            splits.extend([part] * len(found))
    if empty:
        raise DataError(
            f"Image folder {path}: {len(empty)} class folder(s) hold no images: {empty}; "
            f"expected files ending in {sorted(IMAGE_EXTENSIONS)} (any case)"
        )
    return _FolderScan(class_names, files, labels, splits if predefined else None)


def folder_fingerprint(path: str | Path) -> str:
    """A digest of a folder's listing: every file's relative path, size and modification time.

    Changes when files are added, deleted, replaced or edited; cheap (no file is read).
    """
    root = Path(path)
    digest = hashlib.sha256()
    if not root.exists():
        return "missing"
    entries = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in entries:
        stat = file.stat()
        digest.update(f"{file.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def allocate_images(n: int, channels: int, height: int, width: int) -> np.ndarray:
    """An empty uint8 [n, C, H, W] array; MemoryError says how many bytes did not fit."""
    try:
        return np.empty((n, channels, height, width), dtype=np.uint8)
    except MemoryError:
        raise MemoryError(f"{n:,} images of {channels}x{height}x{width} need "
                          f"{n * channels * height * width / 1e9:.1f} GB as uint8") from None


def _report_faults(path: Path, faults: list[str]) -> None:
    """One error naming every file of the folder that could not be read."""
    if faults:
        listed = "\n  ".join(faults)
        raise DataError(f"Cannot read {len(faults)} image(s) in {path}:\n  {listed}")


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit and float images to 0..255: PIL's convert('L') would clip them."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0  # 0..65535 -> 0..255; 'I' above 255 comes from 16-bit files
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0  # float images in [0, 1]
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def decode_image(file: Path, size: int, channels: int) -> np.ndarray:
    """One file -> uint8 [C, size, size], as ``prepare`` stores it (the shorter side resized to ``size``,
    the centre square kept, ``channels`` 1 or 3); any decoder failure is a DataError naming the file."""
    try:
        with Image.open(file) as image:
            # JPEG can decode straight at a reduced scale (1/2, 1/4, 1/8) that still
            # leaves both sides >= size: several times faster for photos much larger
            # than the target (benchmarks/bench_prepare.py measures it).
            image.draft("RGB" if channels == 3 else "L", (size, size))
            image.load()  # decode now, so broken files fail here and not mid-conversion
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I") or image.mode == "F":
                image = _to_8bit_grey(image)
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # PIL warns when P+transparency skips RGBA
            if image.mode not in ("L", "RGB"):
                # Through L/RGB first: PIL has no direct path from every mode (HSV, LAB, ...)
                # to every other one, but all reach these two.
                image = image.convert("L" if _is_grey(image.mode) else "RGB")
            image = image.convert("RGB" if channels == 3 else "L")
            # Keep the aspect ratio: the shorter side to size, then the centre square
            # (one resample of the centre box, antialiased when shrinking).
            image = ImageOps.fit(image, (size, size), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... per format
        raise DataError(f"Cannot read image {file}: {type(exc).__name__}: {exc}") from exc
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _header_mode(file: Path) -> str:
    try:
        with Image.open(file) as image:  # reads the header only
            return image.mode
    except Exception as exc:
        raise DataError(f"Cannot read image {file}: {type(exc).__name__}: {exc}") from exc


def read_image_folder(path: Path, *, image_size: int, channels: int | None = None) -> RawDataset:
    """``path/<class>/<image>`` (or ``path/{train,val,test}/<class>/<image>``) as square
    ``image_size`` images, undecoded (``ImageFiles``) until taken.

    Class names are the sorted subfolder names; hidden entries and files with other
    extensions are skipped. ``channels=None`` gives 1 channel when every image is
    greyscale and 3 otherwise (from the files' headers, every unreadable one named in one error).
    """
    scan = _scan_image_folder(path)
    if channels is None:
        faults: list[str] = []
        modes = []
        for file in scan.files:
            try:
                modes.append(_header_mode(file))
            except DataError as err:
                faults.append(str(err))
        _report_faults(path, faults)
        channels = 1 if all(_is_grey(mode) for mode in modes) else 3
    files = np.empty(len(scan.files), dtype=object)
    files[:] = scan.files
    return RawDataset(images=ImageFiles(path, files, image_size, channels),
                      labels=np.array(scan.labels, dtype=np.int64), class_names=scan.class_names,
                      splits=None if scan.splits is None else np.array(scan.splits))


def decode_workers() -> int:
    """The CPUs this process may run on (its affinity, e.g. a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def decode_images(files: Sequence[Path], *, size: int, channels: int, folder: Path,
                  workers: int | None = None) -> np.ndarray:
    """Decode ``files`` into one preallocated uint8 ``[N, C, size, size]`` array, in file order,
    on ``workers`` threads (default: every CPU this process may use), with a progress report.

    Threads, not processes: PIL releases the GIL while it decodes and resizes, so threads
    use the cores, and they write straight into the output array, where a process pool
    must pickle every decoded image back through an extra copy. On 2 cores both measured
    alike (benchmarks/bench_prepare.py: 1.44x vs 1.52x one worker at 72 px, 1.10x vs
    0.99x at 224 px, on a loaded machine), so the simpler, copy-free one is used.
    The result is the same for any number of workers.
    """
    out = allocate_images(len(files), channels, size, size)
    faults: list[str | None] = [None] * len(files)

    def decode_one(i: int) -> None:
        try:
            out[i] = decode_image(files[i], size, channels)
        except DataError as err:
            faults[i] = str(err)

    progress = Progress(len(files), desc="prepare: decoding images")
    try:
        with ThreadPoolExecutor(max_workers=workers or decode_workers()) as pool:
            for _ in pool.map(decode_one, range(len(files))):
                progress.update()
    finally:
        progress.close()
    _report_faults(folder, [fault for fault in faults if fault is not None])
    return out


class Progress:
    """A tqdm bar in a terminal; elsewhere (DVC, CI, a log file) a line per ~10% on stderr."""

    def __init__(self, total: int, *, desc: str) -> None:
        self.total, self.desc, self.done, self.bar = total, desc, 0, None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, mininterval=0.5)
        self.next_line = 1

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done * 10 >= self.next_line * self.total:
            print(f"{self.desc}: {self.done}/{self.total} ({100 * self.done // self.total}%)",
                  file=sys.stderr, flush=True)
            self.next_line = self.done * 10 // self.total + 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
