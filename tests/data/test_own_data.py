"""Tests of a user's own data (vdm/data/files.py, the tfds:NAME source, num_bits, vocab_size):
what is inferred, the batching guarantees every source keeps (order fixed by (seed, step),
disjoint process shares, eval covered once with a mask), a clear error per bad input, the
registry's 'part:argument' names, and TensorFlow's quiet start-up settings.

Files are written into tmp_path; TFDS runs on tfds.testing.mock_data. The command-line runs of
the same sources (with resume) are in test_own_data_cli.py.
"""

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from vdm import data, runtime
from vdm.config_defaults import base_config
from vdm.data import files
from vdm.registry import Registry
from vdm.run.setup import build_dataset


def data_config(name, **values):
    """config.data for `name`; keys with '__' address a source's sub-dict (tfds__image_size)."""
    cfg = base_config().data
    cfg.name = name
    for key, value in values.items():
        node, _, leaf = key.rpartition("__")
        (cfg[node] if node else cfg)[leaf] = value
    return cfg


def build(name, **values):
    return build_dataset(data_config(name, **values))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def rows(batches):
    """The real (mask 1) rows of eval batches, concatenated per key."""
    keys = [k for k in batches[0] if k != "mask"]
    return {k: np.concatenate([b[k][b["mask"] > 0] for b in batches]) for k in keys}


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


RNG = np.random.default_rng(0)
TRAIN = RNG.integers(0, 256, (37, 6, 5, 3), dtype=np.uint8)
TEST = RNG.integers(0, 256, (11, 6, 5, 3), dtype=np.uint8)
TRAIN_LABELS = np.arange(37) % 4
TEST_LABELS = np.arange(11) % 3


@pytest.fixture
def labelled_npz(tmp_path):
    return write_npz(
        tmp_path / "d.npz",
        train=TRAIN,
        test=TEST,
        train_labels=TRAIN_LABELS,
        test_labels=TEST_LABELS,
    )


# --- npz ------------------------------------------------------------------------------------------


def test_npz_facts_are_inferred_and_recorded(labelled_npz):
    ds = build("npz", path=labelled_npz)
    info = ds.info
    assert (info.shape, info.vocab_size, info.num_classes) == ((6, 5, 3), 256, 4)
    record = data.info_record(info)
    json.dumps(record)  # JSON-ready, for workdir/config.json
    assert record["name"] == "npz" and record["shape"] == [6, 5, 3]
    assert record["num_train"] == 37 and record["num_eval"] == 11
    assert record["path"] == labelled_npz and record["eval_from"] == "array 'test'"


def test_npz_batches_keep_the_built_in_guarantees(labelled_npz):
    ds = build("npz", path=labelled_npz)
    run = take(ds.train_batches(batch_size=8, seed=3, start_step=0), 12)  # crosses epochs
    resumed = take(ds.train_batches(batch_size=8, seed=3, start_step=7), 5)
    for a, b in zip(run[7:], resumed, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert run[0]["x"].dtype == np.uint8 and run[0]["label"].dtype == np.int32
    # Each example's label travels with it.
    index = {TRAIN[i].tobytes(): TRAIN_LABELS[i] for i in range(len(TRAIN))}
    assert all(
        index[x.tobytes()] == y for b in run for x, y in zip(b["x"], b["label"], strict=True)
    )
    shares = [
        take(
            ds.train_batches(batch_size=8, seed=3, start_step=2, process_index=p, process_count=2),
            3,
        )
        for p in range(2)
    ]
    for step in range(3):
        joined = np.concatenate([s[step]["x"] for s in shares])
        np.testing.assert_array_equal(joined, run[2 + step]["x"])
    per_process = [
        list(ds.eval_batches(batch_size=4, process_index=p, process_count=2)) for p in range(2)
    ]
    assert len(per_process[0]) == len(per_process[1]) == 2  # ceil(11 / 8)
    seen = rows([b for batches in per_process for b in batches])
    assert len(seen["x"]) == 11
    order = np.lexsort(seen["x"].reshape(11, -1).T)
    expected = np.lexsort(TEST.reshape(11, -1).T)
    np.testing.assert_array_equal(seen["x"][order], TEST[expected])
    np.testing.assert_array_equal(seen["label"][order], TEST_LABELS[expected])


def test_npz_greyscale_arrays_and_eval_key(tmp_path):
    path = write_npz(tmp_path / "g.npz", train=TRAIN[..., 0], eval=TEST[..., 0])
    info = build("npz", path=path).info
    assert (info.shape, info.num_classes) == ((6, 5, 1), 0)


def test_npz_without_eval_array_holds_out_a_fixed_fraction(tmp_path):
    path = write_npz(tmp_path / "t.npz", train=TRAIN, train_labels=TRAIN_LABELS)
    ds = build("npz", path=path, npz__eval_fraction=0.25)
    again = build("npz", path=path, npz__eval_fraction=0.25)
    ev = rows(list(ds.eval_batches(batch_size=64)))
    assert len(ev["x"]) == 9 and ds.info.details["num_train"] == 28  # round(0.25 * 37)
    np.testing.assert_array_equal(ev["x"], rows(list(again.eval_batches(batch_size=64)))["x"])
    train = np.concatenate(
        [b["x"] for b in take(ds.train_batches(batch_size=28, seed=0, start_step=0), 1)]
    )
    held, used = {x.tobytes() for x in ev["x"]}, {x.tobytes() for x in train}
    assert not held & used and len(held | used) == 37


def test_float_arrays_need_vocab_size_and_integer_values(tmp_path):
    x = (np.arange(40 * 4) % 17).reshape(40, 4).astype(np.float32)
    path = write_npz(tmp_path / "f.npz", train=x, test=x[:8])
    with pytest.raises(ValueError, match="dtype float32, not integers.*data.vocab_size"):
        build("npz", path=path)
    ds = build("npz", path=path, vocab_size=17)
    assert (ds.info.shape, ds.info.vocab_size) == ((4,), 17)
    batch = next(ds.train_batches(batch_size=8, seed=0, start_step=0))
    assert batch["x"].dtype == np.uint8 and batch["x"].max() <= 16
    path = write_npz(tmp_path / "h.npz", train=x + 0.5, test=x[:8])
    with pytest.raises(ValueError, match="non-integer values"):
        build("npz", path=path, vocab_size=17)


def test_vocab_size_declares_another_vocabulary(tmp_path):
    x = np.arange(40 * 4).reshape(40, 4) % 1000
    path = write_npz(tmp_path / "v.npz", train=x, test=x[:8])
    ds = build("npz", path=path, vocab_size=1000)
    batch = next(ds.train_batches(batch_size=8, seed=0, start_step=0))
    assert ds.info.vocab_size == 1000 and batch["x"].dtype == np.int32


def test_num_bits_keeps_the_top_bits(labelled_npz):
    ds = build("npz", path=labelled_npz, num_bits=5)
    plain = build("npz", path=labelled_npz)
    assert ds.info.vocab_size == 32 and ds.info.details["num_bits"] == 5
    a = next(ds.train_batches(batch_size=8, seed=1, start_step=3))
    b = next(plain.train_batches(batch_size=8, seed=1, start_step=3))
    np.testing.assert_array_equal(a["x"], b["x"] >> 3)
    ev = list(ds.eval_batches(batch_size=8))
    assert max(e["x"].max() for e in ev) <= 31 and sum(e["mask"].sum() for e in ev) == 11
    assert data.info_record(ds.info)["vocab_size"] == 32
    with pytest.raises(ValueError, match="num_bits=9 must be between 1 and 8"):
        build("npz", path=labelled_npz, num_bits=9)


# --- bad input: one test per problem, each message naming it -------------------------------------


def test_missing_path_names_it(tmp_path):
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match=f"data.path '{missing}' does not exist"):
        build("npz", path=missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build("folder", path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="data.path is not set"):
        build("npz")


def test_no_images_found_names_the_folder(tmp_path):
    (tmp_path / "imgs" / "cats").mkdir(parents=True)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"No images found in '.*imgs'.*\*\.png"):
        build("folder", path=str(tmp_path / "imgs"))


def test_mixed_shapes_name_both_files(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "b.png", np.zeros((9, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"mixed shapes: .*a\.png is \(8, 8, 3\) but .*b\.png"):
        build("folder", path=str(tmp_path))
    path = write_npz(tmp_path / "m.npz", train=TRAIN, test=TEST[:, :4])
    with pytest.raises(ValueError, match=r"mixed shapes: 'train' examples are \(6, 5, 3\)"):
        build("npz", path=path)


def test_non_integer_dtype_without_vocab_size_names_the_array(tmp_path):
    path = write_npz(tmp_path / "f.npz", train=TRAIN.astype(np.float64) / 255, test=TEST)
    with pytest.raises(ValueError, match=f"array 'train' of data.path '{path}' has dtype float64"):
        build("npz", path=path)


def test_values_outside_the_vocabulary_name_the_array(tmp_path):
    path = write_npz(tmp_path / "o.npz", train=TRAIN.astype(np.int32) - 1, test=TEST)
    with pytest.raises(ValueError, match=r"'train' .* values outside \[0, 256\).*min -1"):
        build("npz", path=path)
    path = write_npz(tmp_path / "p.npz", train=TRAIN, test=TEST)
    with pytest.raises(ValueError, match=r"values outside \[0, 17\) \(data.vocab_size\)"):
        build("npz", path=path, vocab_size=17)
    big = write_npz(tmp_path / "q.npz", train=TRAIN.astype(np.int32) * 4, test=TEST)
    with pytest.raises(ValueError, match=r"set data.vocab_size .*\(at least 1021\)"):
        build("npz", path=big)


def test_label_array_of_the_wrong_length_names_it(tmp_path):
    path = write_npz(
        tmp_path / "l.npz", train=TRAIN, test=TEST, train_labels=TRAIN_LABELS[:30],
        test_labels=TEST_LABELS,
    )  # fmt: skip
    with pytest.raises(ValueError, match="'train_labels' .* has 30 labels but 'train' has 37"):
        build("npz", path=path)


def test_other_bad_npz_layouts_say_what_is_expected(tmp_path):
    path = write_npz(tmp_path / "k.npz", x_train=TRAIN, y_train=TRAIN_LABELS)
    with pytest.raises(ValueError, match="unexpected arrays x_train, y_train.*expected 'train'"):
        build("npz", path=path)
    path = write_npz(tmp_path / "u.npz", train=TRAIN, test=TEST, train_labels=TRAIN_LABELS)
    with pytest.raises(ValueError, match="labels must be given for both splits or neither"):
        build("npz", path=path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable numpy .npz archive"):
        build("npz", path=str(tmp_path / "junk.npz"))


def test_source_keys_for_a_source_that_ignores_them_are_errors(labelled_npz):
    with pytest.raises(ValueError, match="data.path=.* does not apply to data.name='digits'"):
        build("digits", path=labelled_npz)
    with pytest.raises(ValueError, match="data.num_bits=5 does not apply to data.name='gaussian'"):
        build("gaussian", num_bits=5)


# --- image folders ----------------------------------------------------------------------------


def image_folder(root, layout):
    """Writes {relative path: array} PNG/JPEG files under root; returns root as a string."""
    for rel, array in layout.items():
        path = root / rel
        if rel.endswith(".jpg"):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path, quality=95)
        else:
            write_png(path, array)
    return str(root)


def test_folder_class_subfolders_become_sorted_labels(tmp_path):
    rng = np.random.default_rng(1)
    layout = {}
    for cls, count in (("zebra", 3), ("ant", 4), ("moth", 2)):
        for i in range(count):
            layout[f"train/{cls}/{i}.png"] = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        layout[f"test/{cls}/t.png"] = np.full((4, 4, 3), 10 * len(cls), np.uint8)
    layout["train/ant/sub/deep.jpg"] = np.full((4, 4, 3), 128, np.uint8)
    layout["train/.hidden/x.png"] = np.zeros((4, 4, 3), np.uint8)  # skipped
    ds = build("folder", path=image_folder(tmp_path / "f", layout))
    info = ds.info
    assert (info.shape, info.vocab_size, info.num_classes) == ((4, 4, 3), 256, 3)
    assert info.details["class_names"] == ["ant", "moth", "zebra"]
    assert info.details["num_train"] == 10 and info.details["num_eval"] == 3
    assert info.details["eval_from"] == "folder test/"
    ev = rows(list(ds.eval_batches(batch_size=2)))
    # test/<cls>/t.png holds 10 * len(cls): ant 30 -> 0, moth 40 -> 1, zebra 50 -> 2.
    np.testing.assert_array_equal(ev["label"], [0, 1, 2])
    np.testing.assert_array_equal(ev["x"][:, 0, 0, 0], [30, 40, 50])
    batch = next(ds.train_batches(batch_size=10, seed=0, start_step=0))
    assert sorted(np.bincount(batch["label"])) == [2, 3, 5]


def test_folder_pool_is_split_by_a_fixed_permutation(tmp_path):
    layout = {f"img{i:02d}.png": np.full((3, 3, 1), i, np.uint8) for i in range(20)}
    root = image_folder(tmp_path / "pool", layout)
    ds = build("folder", path=root, folder__eval_fraction=0.2)
    ev = rows(list(ds.eval_batches(batch_size=8)))["x"][:, 0, 0, 0]
    _, expected = files.hold_out(20, 0.2, "test")
    np.testing.assert_array_equal(ev, expected)  # file i holds value i
    assert ds.info.shape == (3, 3, 1) and ds.info.num_classes == 0  # greyscale stays 1 channel


def test_folder_image_size_centre_crops_and_box_averages(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (12, 8, 3), dtype=np.uint8)  # taller than wide
    layout = {"train/a.png": image, "train/b.png": image[:8], "test/c.png": image}
    ds = build("folder", path=image_folder(tmp_path / "r", layout), folder__image_size=4)
    assert ds.info.shape == (4, 4, 3)
    got = rows(list(ds.eval_batches(batch_size=1)))["x"][0].astype(int)
    square = image[2:10].astype(float)  # centred 8x8
    box = square.reshape(4, 2, 4, 2, 3).mean((1, 3))
    assert np.abs(got - box).max() <= 1  # PIL's box filter, rounded
    grey = build("folder", path=str(tmp_path / "r"), folder__image_size=4, folder__channels=1)
    assert grey.info.shape == (4, 4, 1)


def test_folder_mixing_grey_and_colour_gives_rgb(tmp_path):
    layout = {"a.png": np.full((4, 4, 1), 7, np.uint8), "b.png": np.zeros((4, 4, 3), np.uint8)}
    layout.update({f"c{i}.png": np.zeros((4, 4, 3), np.uint8) for i in range(8)})
    ds = build("folder", path=image_folder(tmp_path / "mix", layout))
    assert ds.info.shape == (4, 4, 3)


# --- TFDS: any image dataset ---------------------------------------------------------------------

CELEB_SHAPE = (218, 178, 3)


def fake_celeb_a(self, split, decoders=None, read_config=None, shuffle_files=False, **kw):
    """A stand-in for TFDS's reader with celeb_a's features: example i of a split has every
    pixel of row r equal to r + i (at most 240), and 'identity' i."""
    del self, decoders, read_config, shuffle_files, kw
    if isinstance(split, str):
        name, index, count = split, 0, 1
    else:
        name, index, count = split.split, split.index, split.count
    n = {"train": 24, "test": 7}[name]
    lo, hi = index * n // count, (index + 1) * n // count
    rows_ = tf.range(CELEB_SHAPE[0], dtype=tf.int64)

    def example(i):
        image = tf.cast(rows_ + i, tf.uint8)[:, None, None]
        return {
            "image": tf.broadcast_to(image, CELEB_SHAPE),
            "identity": i,
            "attributes": {},
            "landmarks": {},
        }

    return tf.data.Dataset.range(lo, hi).map(example)


def test_any_tfds_image_dataset_by_name():
    with tfds.testing.mock_data(as_dataset_fn=fake_celeb_a):
        ds = build("tfds:celeb_a", data_dir="/nonexistent", tfds__image_size=89)
        info = ds.info
        batch = next(ds.train_batches(batch_size=4, seed=0, start_step=0))
        ev = list(ds.eval_batches(batch_size=3, process_index=1, process_count=2))
        grey = build("tfds:celeb_a", tfds__image_size=16, tfds__channels=1, num_bits=4)
        grey_batch = next(grey.train_batches(batch_size=4, seed=0, start_step=0))
    # 'label' is absent from celeb_a, so it is unlabelled; facts come from the TFDS metadata.
    assert (info.name, info.shape, info.vocab_size, info.num_classes) == (
        "tfds:celeb_a", (89, 89, 3), 256, 0,
    )  # fmt: skip
    assert info.details["num_train"] == 24 and info.details["stored_shape"] == [218, 178, 3]
    assert batch["x"].shape == (4, 89, 89, 3) and "label" not in batch
    # Centre crop to rows 20..197 of 218; area resize 178 -> 89 averages row pairs, so output
    # row k of example i is (20 + 2k + i) + 0.5, rounded either way; columns are all equal.
    x = batch["x"].astype(int)
    assert (x == x[:, :, :1, :1]).all()
    offset = x[:, :, 0, 0] - 2 * np.arange(89)
    assert (offset.max(1) - offset.min(1) <= 1).all() and (offset >= 20).all()
    assert len(ev) == 2 and sum(e["mask"].sum() for e in ev) == 4  # examples 3..6 of 7
    assert grey.info.shape == (16, 16, 1) and grey.info.vocab_size == 16
    assert grey_batch["x"].shape == (4, 16, 16, 1) and grey_batch["x"].max() <= 15


def test_tfds_options_come_from_the_config_sub_dict():
    cfg = data_config("tfds:celeb_a", tfds__image_key="picture")
    with tfds.testing.mock_data(as_dataset_fn=fake_celeb_a):
        with pytest.raises(ValueError, match="no feature 'picture' .*data.tfds.image_key"):
            build_dataset(cfg)
        with pytest.raises(ValueError, match="non-ClassLabel feature 'identity'.*label_key"):
            build("tfds:celeb_a", tfds__label_key="identity")
        with pytest.raises(ValueError, match="data.tfds.eval_split='validaton' is not a split"):
            build("tfds:celeb_a", tfds__eval_split="validaton")


def test_unprepared_tfds_dataset_fails_when_built(tmp_path):
    # No mock: the real TFDS code path on an empty data_dir fails before any batch is asked for.
    with pytest.raises(data.DatasetNotPreparedError, match="tfds build mnist --data_dir=DIR"):
        build("tfds:mnist", data_dir=str(tmp_path))
    with pytest.raises(data.DatasetNotPreparedError, match="TFDS knows no dataset 'no_such_set'"):
        build("tfds:no_such_set", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'tfds' needs its source: write tfds:<source>"):
        build("tfds")


# --- the registry's 'part:argument' names, and start-up settings ---------------------------------


def test_registry_parts_with_an_argument():
    reg = Registry("thing", context=("scale",))
    reg.register(
        "load", lambda source, scale=1, *, upper=False: (source, scale, upper), argument="source"
    )
    reg.register("plain", lambda *, alpha=1: alpha)
    assert reg.defaults() == {"load": {"upper": False}, "plain": {"alpha": 1}}
    assert reg.build("load:a/b:1.0", {"upper": True}, scale=3) == ("a/b:1.0", 3, True)
    assert "load:x" in reg and reg.part_name("load:x") == "load" and "other:x" not in reg
    with pytest.raises(ValueError, match="'load' needs its source: write load:<source>"):
        reg.build("load")
    with pytest.raises(ValueError, match="'plain' takes no ':' argument"):
        reg.build("plain:x")
    with pytest.raises(ValueError, match="choose one of load:<source>, plain"):
        reg.get("nothing")
    with pytest.raises(ValueError, match="may not contain ':'"):
        reg.register("a:b", lambda: None)


def test_quiet_tensorflow_respects_the_users_setting():
    env = {}
    runtime.quiet_tensorflow(env)
    assert env == {"TF_CPP_MIN_LOG_LEVEL": "1", "TF_ENABLE_ONEDNN_OPTS": "0"}
    env = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_ENABLE_ONEDNN_OPTS": "1"}
    runtime.quiet_tensorflow(env)
    assert env == {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_ENABLE_ONEDNN_OPTS": "1"}
