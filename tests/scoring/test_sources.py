"""Input sources of the scoring engine, checked against the data written in ``tmp_path``."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from mmh_jax.scoring.sources import (
    ArrayFile,
    BadItem,
    ImageFolder,
    Item,
    ParquetTable,
    PromptFile,
    Source,
    TarShards,
    _expand_braces,
    fit_image,
    open_source,
)


def _pixels(seed: int, h: int = 6, w: int = 5, c: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _read_all(source, threads: int = 1) -> list:
    if threads == 1:
        return [source[i] for i in range(len(source))]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(source.__getitem__, range(len(source))))


def _same(a: list, b: list) -> bool:
    """Item lists equal field by field (images compared by value)."""
    for x, y in zip(a, b, strict=True):
        if type(x) is not type(y) or x.id != y.id or x.index != y.index:
            return False
        if isinstance(x, Item) and (x.text != y.text or not np.array_equal(x.image, y.image)):
            return False
        if isinstance(x, BadItem) and x.reason != y.reason:
            return False
    return True


def test_pil_keeps_truncated_images_failing():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ----------------------------------------------------------------------------- ImageFolder


def test_image_folder_pixels_ids_captions_sorted(tmp_path):
    images = {"b": _pixels(0), "a": _pixels(1), "sub/c": _pixels(2, 4, 7)}
    (tmp_path / "sub").mkdir()
    for key in ("sub/c", "b", "a"):  # creation order differs from the sorted order
        (tmp_path / f"{key}.png").write_bytes(_encode(images[key]))
    (tmp_path / "a.txt").write_text("  a red cube \n")
    (tmp_path / "notes.md").write_text("ignored")
    source = ImageFolder(tmp_path)
    assert isinstance(source, Source) and source.has_images and source.has_text
    items = _read_all(source)
    assert [it.id for it in items] == ["a", "b", "sub/c"]
    assert [it.index for it in items] == [0, 1, 2]
    assert [it.text for it in items] == ["a red cube", None, None]
    for it in items:
        assert it.image.dtype == np.uint8 and np.array_equal(it.image, images[it.id])
    assert source.describe() == f"image folder {tmp_path.resolve()} (3 images, 1 captions)"
    assert [it.id for it in _read_all(ImageFolder(tmp_path, recursive=False))] == ["a", "b"]
    with pytest.raises(IndexError):
        source[3]
    with pytest.raises(IndexError):
        source[-1]


def test_image_folder_grey_mode_and_suffix_case(tmp_path):
    image = _pixels(3)
    (tmp_path / "x.PNG").write_bytes(_encode(image))
    item = ImageFolder(tmp_path, mode="L")[0]
    assert item.id == "x" and item.image.shape == (6, 5, 1)
    assert np.array_equal(item.image[..., 0], np.asarray(Image.fromarray(image).convert("L")))


def test_image_folder_broken_files_are_bad_items(tmp_path):
    png, jpeg = _encode(_pixels(4, 64, 64)), _encode(_pixels(5, 64, 64), "JPEG")
    (tmp_path / "good.jpg").write_bytes(jpeg)
    (tmp_path / "trunc_png.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "trunc_jpg.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "text.webp").write_text("not an image")
    (tmp_path / "bad_caption.png").write_bytes(png)
    (tmp_path / "bad_caption.txt").write_bytes(b"\xff\xfe caption")
    items = {it.id: it for it in _read_all(ImageFolder(tmp_path))}
    assert isinstance(items["good"], Item) and items["good"].image.shape == (64, 64, 3)
    for key in ("trunc_png", "trunc_jpg", "text"):
        assert isinstance(items[key], BadItem)
        assert items[key].reason.startswith(f"cannot decode image '{key}.")
    assert "truncated" in items["trunc_jpg"].reason
    assert (
        "bad_caption.txt" in items["bad_caption"].reason and "UTF-8" in items["bad_caption"].reason
    )


def test_image_folder_decompression_bomb_is_bad_item(tmp_path, monkeypatch):
    (tmp_path / "big.png").write_bytes(_encode(_pixels(6, 40, 40)))  # 1,600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above the limit...
    with pytest.warns(Image.DecompressionBombWarning):
        item = ImageFolder(tmp_path)[0]
    assert isinstance(item, BadItem) and "decompression-bomb limit" in item.reason
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # ... and raises above twice the limit
    item = ImageFolder(tmp_path)[0]
    assert isinstance(item, BadItem) and "decompression bomb" in item.reason


def test_image_folder_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="argument 'path'"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "a.txt").write_text("caption without image")
    with pytest.raises(ValueError, match="holds no image file"):
        ImageFolder(tmp_path)
    (tmp_path / "a.png").write_bytes(_encode(_pixels(0)))
    (tmp_path / "a.jpg").write_bytes(_encode(_pixels(0), "JPEG"))
    with pytest.raises(ValueError, match="would both have id 'a'"):
        ImageFolder(tmp_path)
    with pytest.raises(ValueError, match="argument 'mode'"):
        ImageFolder(tmp_path, mode="RGBA")


def test_fingerprint_stable_and_sensitive(tmp_path):
    (tmp_path / "a.png").write_bytes(_encode(_pixels(0)))
    before = ImageFolder(tmp_path).fingerprint
    assert ImageFolder(tmp_path).fingerprint == before and str(tmp_path.resolve()) in before
    (tmp_path / "b.png").write_bytes(_encode(_pixels(1)))
    assert ImageFolder(tmp_path).fingerprint != before
    after = ImageFolder(tmp_path).fingerprint
    (tmp_path / "b.txt").write_text("a caption")
    assert ImageFolder(tmp_path).fingerprint != after


# ----------------------------------------------------------------------------- ArrayFile


def test_array_file_npy_rows_and_nan(tmp_path):
    data = np.random.default_rng(0).normal(size=(12, 3, 4, 4)).astype(np.float32)
    data[7, 1, 2, 3] = np.nan
    np.save(tmp_path / "x.npy", data)
    source = ArrayFile(tmp_path / "x.npy")
    assert len(source) == 12 and source.has_images and not source.has_text
    items = _read_all(source)
    assert [it.id for it in items] == [f"{i:02d}" for i in range(12)]
    bad = items[7]
    assert isinstance(bad, BadItem) and "NaN or inf" in bad.reason and bad.id == "07"
    for i, it in enumerate(items):
        if i != 7:
            assert (
                type(it.image) is np.ndarray
                and np.array_equal(it.image, data[i])
                and it.text is None
            )
    loaded = pickle.loads(pickle.dumps(source))
    assert np.array_equal(loaded[3].image, data[3])


def test_array_file_npz_keys_and_ids(tmp_path):
    images = _pixels(0, 5, 8, 8).reshape(5, 8, 8, 1).repeat(3, -1)
    np.savez(tmp_path / "one.npz", images=images, ids=np.array(["p", "q", "r", "s", "t"]))
    source = ArrayFile(tmp_path / "one.npz")
    assert [it.id for it in _read_all(source)] == ["p", "q", "r", "s", "t"]
    assert np.array_equal(source[2].image, images[2])
    assert "['images']" in source.describe()

    np.savez(tmp_path / "two.npz", a=images, b=images)
    with pytest.raises(ValueError, match=r"argument 'key'.*\['a', 'b'\]"):
        ArrayFile(tmp_path / "two.npz")
    with pytest.raises(ValueError, match=r"no array 'c' \(argument 'key'\); arrays: \['a', 'b'\]"):
        ArrayFile(tmp_path / "two.npz", key="c")
    assert np.array_equal(ArrayFile(tmp_path / "two.npz", key="b")[4].image, images[4])
    np.savez(tmp_path / "bad_ids.npz", x=images, ids=np.arange(3))
    with pytest.raises(ValueError, match="ids_key"):
        ArrayFile(tmp_path / "bad_ids.npz")


def test_array_file_metadata_arrays(tmp_path):
    images = _pixels(0, 4, 8, 8).reshape(4, 8, 8, 1)
    labels, counts = np.array([True, False, False, True]), np.array([3, 1, 1, 9])
    np.savez(tmp_path / "m.npz", images=images, label=labels, count=counts)
    source = ArrayFile(tmp_path / "m.npz", metadata=["label", "count"])  # key: the one left
    assert source.metadata["label"].to_pylist() == labels.tolist()
    assert source.metadata["count"].to_pylist() == counts.tolist()
    assert np.array_equal(source[3].image, images[3])
    assert ArrayFile(tmp_path / "m.npz", key="images").metadata == {}
    with pytest.raises(ValueError, match=r"no array \['colour'\] \(argument 'metadata'\)"):
        ArrayFile(tmp_path / "m.npz", metadata=["colour"])
    np.savez(tmp_path / "short.npz", images=images, label=labels[:3])
    with pytest.raises(
        ValueError, match=r"'label'.*\(3,\); expected \(4,\) \(argument 'metadata'\)"
    ):
        ArrayFile(tmp_path / "short.npz", metadata=["label"])
    np.save(tmp_path / "m.npy", images)
    with pytest.raises(ValueError, match="argument 'metadata' applies to .npz"):
        ArrayFile(tmp_path / "m.npy", metadata=["label"])
    with pytest.raises(ValueError, match="argument 'metadata' must be a list"):
        ArrayFile(tmp_path / "m.npz", metadata="label")


def test_array_file_captions(tmp_path):
    images = _pixels(0, 3, 8, 8).reshape(3, 8, 8, 1)
    captions = np.array(["a red cat", "", "two blue squares"])
    np.savez(tmp_path / "c.npz", images=images, captions=captions)
    plain, pairs = (
        ArrayFile(tmp_path / "c.npz", key="images"),
        ArrayFile(tmp_path / "c.npz", captions_key="captions"),
    )  # key: the one left
    assert not plain.has_text and plain[0].text is None
    assert pairs.has_text and [pairs[i].text for i in range(3)] == captions.tolist()
    assert np.array_equal(pairs[2].image, images[2])
    assert pickle.loads(pickle.dumps(pairs))[0].text == "a red cat"
    assert pairs.fingerprint != plain.fingerprint
    with pytest.raises(ValueError, match=r"no array 'text' \(argument 'captions_key'\)"):
        ArrayFile(tmp_path / "c.npz", captions_key="text")
    np.savez(tmp_path / "n.npz", images=images, captions=np.arange(3))
    with pytest.raises(ValueError, match="captions_key"):
        ArrayFile(tmp_path / "n.npz", captions_key="captions")
    np.save(tmp_path / "x.npy", images)
    with pytest.raises(ValueError, match="'captions_key' applies to .npz"):
        ArrayFile(tmp_path / "x.npy", captions_key="captions")


def test_array_file_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="argument 'path'"):
        ArrayFile(tmp_path / "missing.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"n >= 1"):
        ArrayFile(tmp_path / "empty.npy")
    np.save(tmp_path / "flat.npy", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="at least 2 dims"):
        ArrayFile(tmp_path / "flat.npy")
    np.save(tmp_path / "ints.npy", np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError, match="dtype int32"):
        ArrayFile(tmp_path / "ints.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="cannot read"):
        ArrayFile(tmp_path / "junk.npy")


# ----------------------------------------------------------------------------- TarShards


def _shards(tmp_path, count: int = 3, per_shard: int = 4) -> dict[str, tuple[np.ndarray, str]]:
    """Write ``count`` shards of img2dataset samples; return ``{key: (pixels, caption)}``."""
    truth = {}
    for s in range(count):
        members = []
        for j in range(per_shard):
            key = f"{s:05d}{j:04d}"
            truth[key] = (_pixels(100 * s + j), f"caption {key}")
            members += [
                (f"{key}.png", _encode(truth[key][0])),
                (f"{key}.txt", truth[key][1].encode() + b"\n"),
                (f"{key}.json", json.dumps({"key": key}).encode()),
            ]
        _write_tar(tmp_path / f"{s:05d}.tar", members)
    return truth


def test_tar_shards_samples_and_path_forms(tmp_path):
    truth = _shards(tmp_path)
    source = TarShards(str(tmp_path / "{00000..00002}.tar"))
    items = _read_all(source)
    assert [it.id for it in items] == sorted(truth)
    for it in items:
        assert np.array_equal(it.image, truth[it.id][0]) and it.text == truth[it.id][1]
    assert source.has_text and "3 shards, 12 samples, 12 captions" in source.describe()
    folder, listed = (
        TarShards(tmp_path),
        TarShards([tmp_path / "00000.tar", tmp_path / "00001.tar", tmp_path / "00002.tar"]),
    )
    assert folder.fingerprint == listed.fingerprint == source.fingerprint
    assert [it.id for it in _read_all(TarShards(str(tmp_path / "0000[12].tar")))] == sorted(truth)[
        4:
    ]
    reordered = TarShards(str(tmp_path / "{00002,00000}.tar"))
    assert [it.id for it in _read_all(reordered)][:4] == sorted(truth)[8:]


def test_brace_expansion():
    assert _expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert _expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert _expand_braces("{2..0}") == ["2", "1", "0"]
    assert _expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert _expand_braces("x{a,b{1,2}}") == ["xa", "xb1", "xb2"]
    assert _expand_braces("{a}/{}/no{brace") == ["{a}/{}/no{brace"]


def test_tar_shards_broken_samples(tmp_path):
    png = _encode(_pixels(9))
    _write_tar(
        tmp_path / "s.tar",
        [
            ("dir/ok.png", png),
            ("dir/ok.txt", b"fine"),
            ("noimage.txt", b"caption only"),
            ("noimage.json", b"{}"),
            ("garbage.jpg", b"\x00not a jpeg at all"),
            ("latin.png", png),
            ("latin.txt", b"caf\xe9"),
        ],
    )
    items = {it.id: it for it in _read_all(TarShards(tmp_path / "s.tar"))}
    assert list(items) == ["dir/ok", "noimage", "garbage", "latin"]
    assert np.array_equal(items["dir/ok"].image, _pixels(9)) and items["dir/ok"].text == "fine"
    assert items["noimage"].reason == "no image member (found: .txt, .json) in s.tar"
    assert items["garbage"].reason.startswith("cannot decode image 's.tar:garbage'")
    assert isinstance(items["latin"], BadItem) and "not UTF-8" in items["latin"].reason


def test_tar_shards_truncated_and_unreadable_shard(tmp_path):
    truth = _shards(tmp_path, count=2, per_shard=4)
    whole = (tmp_path / "00000.tar").read_bytes()
    with tarfile.open(tmp_path / "00000.tar") as tar:
        cut = tar.getmember("000000002.png").offset_data + 10  # inside the third sample's image
    (tmp_path / "00000.tar").write_bytes(whole[:cut])
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 2000)
    items = _read_all(
        TarShards([tmp_path / "00000.tar", tmp_path / "junk.tar", tmp_path / "00001.tar"])
    )
    ids = [it.id for it in items]
    assert (
        ids
        == ["000000000", "000000001", "00000.tar:<unreadable>", "junk.tar:<unreadable>"]
        + sorted(truth)[4:]
    )
    for it in items[:2] + items[4:]:
        assert isinstance(it, Item) and np.array_equal(it.image, truth[it.id][0])
    assert "damaged" in items[2].reason and "'000000002'" in items[2].reason
    assert items[3].reason.startswith("cannot open tar shard")
    # cut at a member boundary (no end-of-archive marker): the last sample may be incomplete
    with tarfile.open(tmp_path / "00001.tar") as tar:
        boundary = tar.getmember("000010003.png").offset
    (tmp_path / "00001.tar").write_bytes((tmp_path / "00001.tar").read_bytes()[:boundary])
    items = _read_all(TarShards(tmp_path / "00001.tar"))
    assert [it.id for it in items] == ["000010000", "000010001", "00001.tar:<unreadable>"]


def test_tar_shards_argument_errors(tmp_path):
    _shards(tmp_path, count=1)
    with pytest.raises(FileNotFoundError, match="argument 'paths'"):
        TarShards(str(tmp_path / "{00000..00001}.tar"))
    with pytest.raises(ValueError, match=r"'000000000' is in both .*00000\.tar and .*00000\.tar"):
        TarShards([tmp_path / "00000.tar", tmp_path / "00000.tar"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*\.tar"):
        TarShards(tmp_path / "empty")


# ----------------------------------------------------------------------------- ParquetTable


def _table(
    tmp_path, rows: int = 10, row_group_size: int = 3, struct: bool = False
) -> list[np.ndarray]:
    images = [_pixels(200 + i, 5 + i % 3, 4) for i in range(rows)]
    encoded = [None if i == 4 else _encode(im) for i, im in enumerate(images)]  # row 4: null image
    column = pa.array(encoded, pa.binary())
    if struct:
        paths = pa.array([f"{i}.png" for i in range(rows)])
        column = pa.StructArray.from_arrays([column, paths], names=["bytes", "path"])
    table = pa.table(
        {
            "id": pa.array(range(100, 100 + rows)),
            "image": column,
            "caption": [f"c{i}" for i in range(rows)],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=row_group_size)
    return images


@pytest.mark.parametrize("struct", [False, True])
def test_parquet_table_images_ids_null(tmp_path, struct):
    images = _table(tmp_path, struct=struct)
    source = ParquetTable(tmp_path / "t.parquet")
    items = _read_all(source)
    assert [it.id for it in items] == [str(100 + i) for i in range(10)]
    assert isinstance(items[4], BadItem) and "null" in items[4].reason
    for i, it in enumerate(items):
        if i != 4:
            assert np.array_equal(it.image, images[i]) and it.text == f"c{i}"
    assert _same(_read_all(source, threads=8), items)
    assert _same(_read_all(pickle.loads(pickle.dumps(source))), items)


def test_parquet_folder_prompt_table_and_defaults(tmp_path):
    (tmp_path / "prompts").mkdir()
    pq.write_table(pa.table({"caption": ["b0", "b1"]}), tmp_path / "prompts" / "b.parquet")
    pq.write_table(pa.table({"caption": ["a0"]}), tmp_path / "prompts" / "a.parquet")
    source = ParquetTable(tmp_path / "prompts")
    assert not source.has_images and source.has_text
    assert _read_all(source) == [
        Item(0, "0", None, "a0"),
        Item(1, "1", None, "b0"),
        Item(2, "2", None, "b1"),
    ]
    _table(tmp_path, rows=3)
    only_images = ParquetTable(tmp_path / "t.parquet", text_column=None, id_column=None)
    assert not only_images.has_text and [it.id for it in _read_all(only_images)] == ["0", "1", "2"]


def test_parquet_metadata_columns(tmp_path):
    (tmp_path / "prompts").mkdir()
    pq.write_table(
        pa.table({"caption": ["b0", "b1"], "memorized": [True, None], "n": [5, 6]}),
        tmp_path / "prompts" / "b.parquet",
    )
    pq.write_table(
        pa.table({"caption": ["a0"], "memorized": [False], "n": [4]}),
        tmp_path / "prompts" / "a.parquet",
    )
    source = ParquetTable(tmp_path / "prompts", metadata=["memorized", "n", "caption"])
    assert source.metadata["memorized"].to_pylist() == [False, True, None]  # files by name
    assert source.metadata["n"].to_pylist() == [4, 5, 6]
    assert source.metadata["caption"].to_pylist() == [it.text for it in _read_all(source)]
    assert ParquetTable(tmp_path / "prompts").metadata == {}
    with pytest.raises(ValueError, match=r"no column \['label'\] \(argument 'metadata'\)"):
        ParquetTable(tmp_path / "prompts", metadata=["label"])
    pq.write_table(pa.table({"caption": ["c0"], "n": [7]}), tmp_path / "prompts" / "c.parquet")
    with pytest.raises(
        ValueError, match=r"c\.parquet \(under argument 'path'\) lacks columns \['memorized'\]"
    ):
        ParquetTable(tmp_path / "prompts", metadata=["memorized"])


def test_parquet_argument_errors(tmp_path):
    _table(tmp_path, rows=3)
    with pytest.raises(
        ValueError,
        match=r"no column 'img' \(argument 'image_column'\); columns: \['id', 'image', 'caption'\]",
    ):
        ParquetTable(tmp_path / "t.parquet", image_column="img")
    with pytest.raises(ValueError, match="argument 'text_column'"):
        ParquetTable(tmp_path / "t.parquet", text_column="prompt")
    with pytest.raises(ValueError, match="argument 'text_column'.*expected string"):
        ParquetTable(tmp_path / "t.parquet", text_column="id")
    pq.write_table(pa.table({"other": [1, 2]}), tmp_path / "o.parquet")
    with pytest.raises(ValueError, match=r"neither an image column.*columns: \['other'\]"):
        ParquetTable(tmp_path / "o.parquet")
    with pytest.raises(FileNotFoundError, match="argument 'path'"):
        ParquetTable(tmp_path / "missing.parquet")


def test_tar_and_parquet_thread_safe(tmp_path):
    _shards(tmp_path, count=3, per_shard=6)
    tar = TarShards(tmp_path)
    assert _same(_read_all(tar, threads=8), _read_all(tar))
    _table(tmp_path, rows=40, row_group_size=4)
    table = ParquetTable(tmp_path / "t.parquet")
    assert _same(_read_all(table, threads=8), _read_all(table))


# ----------------------------------------------------------------------------- PromptFile


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("  a cat \n\n a dog\n")
    source = PromptFile(tmp_path / "p.txt")
    assert not source.has_images and source.has_text
    assert _read_all(source) == [Item(0, "line1", None, "a cat"), Item(1, "line3", None, "a dog")]
    lines = [{"caption": "one", "id": 7}, {"prompt": "two"}, {"caption": " three "}]
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    assert [(it.id, it.text) for it in _read_all(PromptFile(tmp_path / "p.jsonl"))] == [
        ("7", "one"),
        ("line2", "two"),
        ("line3", "three"),
    ]
    # the other fields of a line are kept (labels for sd detect), with its line number
    (tmp_path / "l.jsonl").write_text('\n{"caption": "a", "label": 1, "url": "u"}\n')
    assert PromptFile(tmp_path / "l.jsonl").fields(0) == (
        2,
        {"caption": "a", "label": 1, "url": "u"},
    )
    assert PromptFile(tmp_path / "p.txt").fields(1) == (3, {})


def test_prompt_file_metadata_fields(tmp_path):
    lines = [
        {"caption": "a", "label": "memorized", "count": 3},
        {"caption": "b", "label": "not"},
        {"caption": "c", "count": 1, "id": "x"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    source = PromptFile(tmp_path / "m.jsonl", metadata=["label", "count", "caption"])
    assert list(source.metadata) == ["label", "count", "caption"]
    assert source.metadata["label"].to_pylist() == ["memorized", "not", None]
    assert source.metadata["count"].to_pylist() == [3, None, 1]
    assert pa.types.is_integer(source.metadata["count"].type)
    assert source.metadata["caption"].to_pylist() == ["a", "b", "c"]
    assert PromptFile(tmp_path / "m.jsonl").metadata == {}
    with pytest.raises(
        ValueError, match="no line of .* has a field 'url' \\(argument 'metadata'\\)"
    ):
        PromptFile(tmp_path / "m.jsonl", metadata=["url"])
    (tmp_path / "mixed.jsonl").write_text(
        '{"caption": "a", "label": 1}\n{"caption": "b", "label": "x"}\n'
    )
    with pytest.raises(ValueError, match="field 'label' .* one type on every line"):
        PromptFile(tmp_path / "mixed.jsonl", metadata=["label"])
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match="argument 'metadata' applies to .jsonl"):
        PromptFile(tmp_path / "p.txt", metadata=["label"])
    with pytest.raises(ValueError, match="distinct"):
        PromptFile(tmp_path / "m.jsonl", metadata=["label", "label"])


def test_prompt_file_argument_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"caption": "ok"}\n\n{"caption": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: needs a string 'caption'"):
        PromptFile(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"caption": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        PromptFile(tmp_path / "broken.jsonl")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        PromptFile(tmp_path / "empty.txt")


# ----------------------------------------------------------------------------- open_source and fit_image


def test_open_source_picks_the_class(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_encode(_pixels(0)))
    (tmp_path / "imgs" / "b.tar").write_bytes(b"")  # a folder with images is an image folder
    (tmp_path / "shards").mkdir()
    _shards(tmp_path / "shards", count=2)
    (tmp_path / "tables").mkdir()
    _table(tmp_path / "tables", rows=2)
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 3), np.float32))
    (tmp_path / "p.txt").write_text("a prompt\n")
    (tmp_path / "p.jsonl").write_text('{"caption": "a prompt"}\n')
    expected = {
        "imgs": ImageFolder,
        "shards": TarShards,
        "shards/00000.tar": TarShards,
        "shards/{00000..00001}.tar": TarShards,
        "shards/*.tar": TarShards,
        "tables": ParquetTable,
        "tables/t.parquet": ParquetTable,
        "x.npy": ArrayFile,
        "x.npz": ArrayFile,
        "p.txt": PromptFile,
        "p.jsonl": PromptFile,
    }
    for name, cls in expected.items():
        assert type(open_source(str(tmp_path / name))) is cls, name
    assert open_source(tmp_path / "imgs", mode="L")[0].image.shape == (6, 5, 1)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"accepted: .*\.npy"):
        open_source(tmp_path / "x.csv")
    with pytest.raises(TypeError, match="option 'mode' does not apply to ArrayFile"):
        open_source(tmp_path / "x.npy", mode="RGB")
    with pytest.raises(FileNotFoundError, match="argument 'path'"):
        open_source(tmp_path / "nothing")


def test_fit_image():
    image = _pixels(0, 64, 48)
    assert fit_image(image, 32, resize="none") == "image is 64x48, expected 32x32 (resize='none')"
    assert fit_image(image, (64, 48), resize="none") is image
    cropped = fit_image(image, 32, resize="center_crop")
    assert cropped.shape == (32, 32, 3) and cropped.dtype == np.uint8
    square = _pixels(1, 32, 32)
    assert np.array_equal(fit_image(square, 32, resize="center_crop"), square)
    # a constant image stays constant; the crop keeps the centre (rows 5..37 of 43 after the resize)
    stripes = np.zeros((64, 48, 1), np.uint8)
    stripes[:6] = 255
    assert np.all(fit_image(stripes, 32, resize="center_crop") < 255)
    floats = np.full((10, 20, 2), 0.5, np.float32)
    out = fit_image(floats, (5, 5), resize="center_crop")
    assert out.shape == (5, 5, 2) and out.dtype == np.float32 and np.allclose(out, 0.5)
    assert "got shape" in fit_image(np.zeros((4, 4), np.uint8), 4, resize="center_crop")
