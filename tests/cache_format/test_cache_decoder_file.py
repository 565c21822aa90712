"""``teacher_decoder.npz``: the teacher's prompt encoder + mask decoder weights inside a cache --
plain arrays with their sha256 in the manifest, checked on read and by verify, carried by merge,
shown by inspect; caches without it (older ones) stay readable."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from maskteacher.cache_format import CacheError, finalize, open_cache
from maskteacher.cache_format.decoder_file import (
    DECODER_FILE,
    encode_decoder_arrays,
    write_decoder_weights,
)
from maskteacher.cache_format.manifest import Manifest
from maskteacher.cache_format.merge import merge_caches
from maskteacher.cache_format.summary import inspect_cache
from maskteacher.cache_format.verify import verify_cache

ARRAYS = {
    "mask_decoder.iou_token.weight": np.arange(8, dtype=np.float32).reshape(1, 8),
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": np.ones((2, 4), np.float32),
}


def test_written_arrays_read_back_through_the_manifest(small_cache):
    root, _, _ = small_cache
    assert open_cache(root).manifest.decoder is None  # none yet: still a valid cache
    write_decoder_weights(root, ARRAYS)
    manifest = finalize(root)
    assert manifest.decoder.path == DECODER_FILE and manifest.decoder.arrays == 2
    assert manifest.decoder.bytes == os.path.getsize(os.path.join(root, DECODER_FILE))
    again = Manifest.from_json(json.loads(json.dumps(manifest.to_json())))
    assert again.decoder == manifest.decoder
    got = open_cache(root).decoder_weights()
    assert sorted(got) == sorted(ARRAYS)
    assert all(np.array_equal(got[k], v) and got[k].dtype == v.dtype for k, v in ARRAYS.items())


def test_the_same_weights_give_the_same_bytes_and_others_are_refused(small_cache):
    root, _, _ = small_cache
    assert encode_decoder_arrays(ARRAYS) == encode_decoder_arrays(dict(reversed(ARRAYS.items())))
    write_decoder_weights(root, ARRAYS)
    write_decoder_weights(root, ARRAYS)  # a second worker of the same teacher: fine
    other = {k: v + 1 for k, v in ARRAYS.items()}
    with pytest.raises(CacheError, match="other teacher decoder weights"):
        write_decoder_weights(root, other)


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"image_encoder.patch_embed.proj.weight": np.ones(2, np.float32)}, "bad array name"),
        ({"mask_decoder.x": np.array(["a"], dtype=object)}, "dtype object"),
        ({}, "no arrays"),
    ],
)
def test_only_decoder_arrays_of_numbers_are_written(arrays, needle, tmp_path):
    with pytest.raises(CacheError, match=needle):
        write_decoder_weights(tmp_path, arrays)


def test_a_changed_or_pickled_file_is_refused(small_cache):
    root, _, _ = small_cache
    write_decoder_weights(root, ARRAYS)
    finalize(root)
    path = Path(root) / DECODER_FILE
    data = bytearray(path.read_bytes())
    data[-30] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="fails its sha256 check"):
        open_cache(root).decoder_weights()
    report = verify_cache(root, progress=False)
    assert not report.ok and any(p.where == DECODER_FILE for p in report.problems)
    # an object array (a pickle) never loads, even with a matching manifest entry
    buffer = io.BytesIO()
    np.savez(buffer, **{"mask_decoder.x": np.array([{"a": 1}], dtype=object)})
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CacheError, match="not a readable .npz of plain arrays"):
        finalize(root)


def test_merge_carries_the_file_and_inspect_shows_it(small_cache, tmp_path):
    root, _, _ = small_cache
    write_decoder_weights(root, ARRAYS)
    finalize(root)
    out = tmp_path / "merged"
    manifest = merge_caches(out, [root])
    assert manifest.decoder is not None and (out / DECODER_FILE).is_file()
    assert verify_cache(str(out), progress=False).ok
    info = inspect_cache(str(out))
    assert info["teacher_decoder"]["arrays"] == 2 and info["embedding_bytes_per_image"] is None


def test_merge_refuses_two_different_decoders(small_cache, tmp_path):
    root, _, _ = small_cache
    other = tmp_path / "other"
    shutil.copytree(root, other)
    write_decoder_weights(root, ARRAYS)
    write_decoder_weights(other, {k: v * 2 for k, v in ARRAYS.items()})
    with pytest.raises(CacheError, match="other teacher decoder weights"):
        merge_caches(tmp_path / "merged", [root, str(other)])


def test_inspect_states_the_embedding_size(tmp_path, write_cache, make_header, make_record):
    from maskteacher.cache_format import StoreFlags

    rng = np.random.default_rng(0)
    hdr = make_header(store=StoreFlags(teacher=True, gt=True, embedding=True))
    records = [make_record(rng, f"i{k}", n=2, m=1, embed_dim=256) for k in range(2)]
    write_cache(str(tmp_path / "c"), hdr, {"w0-00000": records})
    info = inspect_cache(str(tmp_path / "c"))
    assert info["embedding_bytes_per_image"] == 256 * 4 * 4 * 2  # C x E x E fp16 (E = 64 / 16)
