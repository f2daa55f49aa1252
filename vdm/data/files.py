"""A user's own data from files: a numpy .npz archive or a folder of PNG/JPEG images.

Both are read whole into host memory when the dataset is built (so a problem surfaces before
any compilation, naming the file) and then batched like every in-memory dataset
(vdm/data/memory.py): batches fixed by (seed, step), each process taking its rows of the
global batch, the eval split covered once with a padding mask.

npz (data.name=npz, data.path=FILE.npz):
  train                 [N, ...] examples: [N, H, W, C] images, [N, H, W] greyscale images
                        (a channel axis is added) or [N, D] vectors;
  test or eval          the evaluation examples, same per-example shape;
  train_labels          optional [N] integer class ids (then test_labels/eval_labels too).
  Without a test/eval array, a fixed eval_fraction of train is held out (below).

folder (data.name=folder, data.path=DIR):
  DIR/train/ and DIR/test/ (or DIR/eval/)  the two splits, when DIR has a train/ folder;
  otherwise DIR itself is the pool of examples and a fixed eval_fraction is held out.
  In a split, class sub-folders (DIR/train/cat/*.png, ...) make the images labelled, with
  label ids in sorted folder-name order taken from the training split; images directly in
  the split folder are unlabelled. Files are read in sorted path order; names starting with
  '.' are skipped.

Hold-out rule (both sources): the examples, in file/array order, are permuted with
numpy.random.default_rng(0) and the first round(eval_fraction * N) (at least 1) become the eval
split, so the split is the same on every host and for every run seed.
"""

import zipfile
from pathlib import Path

import numpy as np

from vdm.data import values

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EVAL_FOLDERS = ("test", "eval")
SPLIT_SEED = 0


def _existing(path, kind: str) -> Path:
    if not path:
        raise ValueError(f"data.path is not set: give the {kind} to read (--config.data.path=...).")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"data.path {str(p)!r} does not exist; point --config.data.path at the {kind}."
        )
    want_dir = kind == "folder"
    if want_dir != p.is_dir():
        what = "a folder" if p.is_dir() else "a file"
        raise ValueError(f"data.path {str(p)!r} is {what}; data.name needs a {kind} there.")
    return p.resolve()


def hold_out(n: int, eval_fraction: float, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, eval indices) of the fixed hold-out rule (module docstring)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction} for {where} must be in (0, 1).")
    num_eval = max(1, int(round(eval_fraction * n)))
    if num_eval >= n:
        raise ValueError(
            f"{where} has {n} examples: too few to hold out an eval split "
            f"(eval_fraction={eval_fraction}); add a separate eval split."
        )
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(order[num_eval:]), np.sort(order[:num_eval])


def _labels(y: np.ndarray, n: int, where: str, of: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{where} has shape {y.shape}; labels must be one integer per example.")
    if len(y) != n:
        raise ValueError(
            f"{where} has {len(y)} labels but {of} has {n} examples: a label array of the "
            "wrong length."
        )
    if y.dtype.kind not in "uib":
        raise ValueError(f"{where} has dtype {y.dtype}; labels must be integer class ids.")
    if len(y) and y.min() < 0:
        raise ValueError(f"{where} has negative labels (min {y.min()}); class ids start at 0.")
    return y.astype(np.int32)


# --- npz ------------------------------------------------------------------------------------

NPZ_KEYS = ("train", "test", "eval", "train_labels", "test_labels", "eval_labels")


def load_npz(path, *, vocab_size: int, eval_fraction: float):
    """Reads an .npz archive (module docstring).

    Args:
      path: the .npz file (data.path).
      vocab_size: data.vocab_size (0 infers it; see values.integer_codes).
      eval_fraction: the fraction held out when there is no test/eval array.

    Returns:
      (splits, vocab_size, num_classes, facts): splits = {'train': {'x', ['label']}, 'eval':
      {...}} with 'x' in values.code_dtype(vocab_size); facts = what else was found (source,
      path, example counts, where the eval split came from).
    """
    p = _existing(path, "file")
    name = f"data.path {str(p)!r}"
    try:
        archive = np.load(p, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{name} is not a readable numpy .npz archive: {err}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{name} holds a single array; save the splits by name: "
            "np.savez(path, train=..., test=..., train_labels=..., test_labels=...)."
        )
    with archive:
        keys = set(archive.files)
        unknown = sorted(keys - set(NPZ_KEYS))
        if unknown or "train" not in keys:
            problem = f"has unexpected arrays {', '.join(unknown)}" if unknown else "has no 'train'"
            raise ValueError(
                f"{name} {problem} (it holds {', '.join(sorted(keys)) or 'nothing'}); expected "
                "'train' and optionally 'test' (or 'eval'), 'train_labels', 'test_labels' "
                "(or 'eval_labels')."
            )
        if {"test", "eval"} <= keys:
            raise ValueError(f"{name} has both 'test' and 'eval'; keep one as the eval split.")
        eval_key = "test" if "test" in keys else "eval" if "eval" in keys else None
        for key in ("test_labels", "eval_labels"):
            if key in keys and key.split("_")[0] != eval_key:
                raise ValueError(f"{name} has {key!r} but no {key.split('_')[0]!r} array.")
        labelled = "train_labels" in keys
        if eval_key and labelled != (f"{eval_key}_labels" in keys):
            raise ValueError(
                f"{name}: labels must be given for both splits or neither "
                f"(found {', '.join(k for k in sorted(keys) if k.endswith('_labels'))})."
            )
        arrays = {k: _read_array(archive, k, name) for k in sorted(keys)}

    train = _examples(arrays["train"], f"array 'train' of {name}")
    shape = train.shape[1:]
    if eval_key:
        ev = _examples(arrays[eval_key], f"array {eval_key!r} of {name}")
        if ev.shape[1:] != shape:
            raise ValueError(
                f"{name}: mixed shapes: 'train' examples are {shape} but {eval_key!r} examples "
                f"are {ev.shape[1:]}."
            )
    x_train, vocab = values.integer_codes(train, vocab_size, f"array 'train' of {name}")
    splits = {"train": {"x": x_train}}
    if eval_key:
        splits["eval"] = {"x": values.integer_codes(ev, vocab, f"array {eval_key!r} of {name}")[0]}
    if labelled:
        splits["train"]["label"] = _labels(
            arrays["train_labels"], len(train), f"array 'train_labels' of {name}", "'train'"
        )
        if eval_key:
            splits["eval"]["label"] = _labels(
                arrays[f"{eval_key}_labels"],
                len(ev),
                f"array '{eval_key}_labels' of {name}",
                repr(eval_key),
            )
    if eval_key:
        eval_from = f"array {eval_key!r}"
    else:
        tr, ev_idx = hold_out(len(x_train), eval_fraction, name)
        whole = splits["train"]
        splits = {
            "train": {k: v[tr] for k, v in whole.items()},
            "eval": {k: v[ev_idx] for k, v in whole.items()},
        }
        eval_from = f"held out {eval_fraction:g} of 'train' (fixed permutation, seed {SPLIT_SEED})"
    facts = {
        "source": "npz",
        "path": str(p),
        "eval_from": eval_from,
        "stored_dtype": str(train.dtype),
    }
    return _finish(splits, vocab, facts)


def _read_array(archive, key: str, name: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as err:  # object arrays need pickle, which is off
        raise ValueError(f"array {key!r} of {name} cannot be read without pickle: {err}") from err


def _examples(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim < 2:
        raise ValueError(
            f"{where} has shape {x.shape}; expected one example per row: [N, H, W, C] images, "
            "[N, H, W] greyscale images or [N, D] vectors."
        )
    if len(x) == 0:
        raise ValueError(f"{where} has no examples.")
    return x[..., None] if x.ndim == 3 else x


def _finish(splits: dict, vocab: int, facts: dict, num_classes: int | None = None):
    """The loaders' return value; num_classes defaults to the largest label + 1."""
    labels = [s["label"] for s in splits.values() if "label" in s]
    if num_classes is None:
        num_classes = int(max(int(y.max()) for y in labels) + 1) if labels else 0
    facts = dict(
        facts,
        num_train=len(splits["train"]["x"]),
        num_eval=len(splits["eval"]["x"]),
    )
    return splits, vocab, num_classes, facts


# --- image folders ----------------------------------------------------------------------------


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        f
        for f in found
        if f.is_file()
        and f.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
    )


def _scan_split(folder: Path) -> tuple[list[Path], dict[str, list[Path]] | None]:
    """(images directly in folder, {class: images} or None when there are no class folders)."""
    direct = _images_in(folder, recursive=False)
    classes = {
        d.name: _images_in(d, recursive=True)
        for d in sorted(folder.iterdir())
        if d.is_dir() and _visible(d)
    }
    classes = {k: v for k, v in classes.items() if v}
    if classes and direct:
        raise ValueError(
            f"{str(folder)!r} mixes images ({direct[0].name}, ...) with class sub-folders "
            f"({', '.join(list(classes)[:3])}); put every image in a class folder, or none."
        )
    return direct, (classes or None)


def _split_folders(root: Path) -> tuple[Path, Path | None, str]:
    subdirs = {d.name for d in root.iterdir() if d.is_dir()}
    evals = [name for name in EVAL_FOLDERS if name in subdirs]
    if len(evals) > 1:
        raise ValueError(f"data.path {str(root)!r} has both test/ and eval/; keep one.")
    if "train" in subdirs:
        if evals:
            return root / "train", root / evals[0], f"folder {evals[0]}/"
        return root / "train", None, "held out"
    if evals:
        raise ValueError(
            f"data.path {str(root)!r} has a {evals[0]}/ folder but no train/ folder; put the "
            "training images in train/ (or remove the split folders to hold out a fraction)."
        )
    return root, None, "held out"


def load_folder(path, *, image_size: int, channels: int, vocab_size: int, eval_fraction: float):
    """Reads a folder of PNG/JPEG images (module docstring).

    Args:
      path: the folder (data.path).
      image_size: 0 keeps the images' own size (they must all agree); s > 0 crops each image
        to its centred square and shrinks it to s x s by area (box-filter) averaging.
      channels: 0 keeps greyscale data greyscale (1 channel; if any image has colour, every
        image becomes RGB), 1 converts to greyscale (ITU-R 601 luma), 3 to RGB. Alpha is
        dropped.
      vocab_size: data.vocab_size (0: 256, the 8-bit range of PNG/JPEG).
      eval_fraction: the fraction held out when there is no test/ or eval/ folder.

    Returns:
      (splits, vocab_size, num_classes, facts) as load_npz.
    """
    root = _existing(path, "folder")
    if image_size < 0:
        raise ValueError(f"data.folder.image_size={image_size} must be >= 0 (0: as stored).")
    if channels not in (0, 1, 3):
        raise ValueError(f"data.folder.channels={channels} must be 0 (as stored), 1 or 3.")
    train_dir, eval_dir, eval_from = _split_folders(root)
    direct, classes = _scan_split(train_dir)
    class_names = sorted(classes) if classes else []
    listed = {"train": _labelled(direct, classes, class_names)}
    if eval_dir is not None:
        ev_direct, ev_classes = _scan_split(eval_dir)
        if bool(ev_classes) != bool(classes):
            raise ValueError(
                f"{str(eval_dir)!r} and {str(train_dir)!r} disagree on class sub-folders: "
                "both splits must be labelled (class folders) or neither."
            )
        extra = sorted(set(ev_classes or ()) - set(class_names))
        if extra:
            raise ValueError(
                f"{str(eval_dir)!r} has classes {', '.join(extra)} that {str(train_dir)!r} lacks."
            )
        listed["eval"] = _labelled(ev_direct, ev_classes, class_names)
    for split, (paths, _) in listed.items():
        if not paths:
            folder = train_dir if split == "train" else eval_dir
            raise ValueError(
                f"No images found in {str(folder)!r} (looked for "
                f"{', '.join('*' + s for s in IMAGE_SUFFIXES)}, in class sub-folders or directly)."
            )
    images = {
        split: _read_images(paths, image_size, channels) for split, (paths, _) in listed.items()
    }
    # channels 0: greyscale stays greyscale unless some image has colour.
    colour = any(x.shape[-1] == 3 for imgs in images.values() for x in imgs)
    shapes = {}
    for split, imgs in images.items():
        if colour:
            imgs = images[split] = [
                np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x for x in imgs
            ]
        for f, x in zip(listed[split][0], imgs, strict=True):
            shapes.setdefault(x.shape, f)
            if len(shapes) > 1:
                (s0, f0), (s1, f1) = shapes.items()
                raise ValueError(
                    f"Images in {str(root)!r} have mixed shapes: {f0} is {s0} but {f1} is {s1}; "
                    "set data.folder.image_size to centre-crop and resize them to one size."
                )
    splits = {}
    for split, imgs in images.items():
        x, vocab = values.integer_codes(np.stack(imgs), vocab_size, f"images in {str(root)!r}")
        splits[split] = {"x": x}
        if class_names:
            splits[split]["label"] = np.asarray(listed[split][1], np.int32)
    if eval_dir is None:
        tr, ev = hold_out(len(splits["train"]["x"]), eval_fraction, f"data.path {str(root)!r}")
        whole = splits["train"]
        splits = {
            "train": {k: v[tr] for k, v in whole.items()},
            "eval": {k: v[ev] for k, v in whole.items()},
        }
        eval_from = f"held out {eval_fraction:g} (fixed permutation, seed {SPLIT_SEED})"
    facts = {"source": "folder", "path": str(root), "eval_from": eval_from}
    if class_names:
        facts["class_names"] = class_names
    # Class ids come from the folder names, not from the largest label seen.
    return _finish(splits, vocab, facts, num_classes=len(class_names))


def _labelled(direct, classes, class_names):
    if not classes:
        return direct, []
    paths, labels = [], []
    for name, found in classes.items():
        paths += found
        labels += [class_names.index(name)] * len(found)
    return paths, labels


def _read_images(paths: list[Path], image_size: int, channels: int) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for f in paths:
        try:
            with Image.open(f) as img:
                img.load()
                out.append(_decode(img, image_size, channels))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"Cannot read image {str(f)!r}: {err}") from err
    return out


GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")


def _decode(img, image_size: int, channels: int) -> np.ndarray:
    """A PIL image -> uint8 [H, W, 1] or [H, W, 3] (channels 0: 1 for greyscale modes, else 3),
    cropped to its centred square and box-resized when image_size > 0."""
    from PIL import Image

    if not channels:
        channels = 1 if img.mode in GREY_MODES else 3
    img = img.convert("L" if channels == 1 else "RGB")
    if image_size:
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
        img = img.resize((image_size, image_size), Image.Resampling.BOX)
    x = np.asarray(img, dtype=np.uint8)
    return x[..., None] if x.ndim == 2 else x
