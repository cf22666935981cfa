"""The served model's input policy (:mod:`dtl.model.decode`): which values become RGB arrays, the
size bounds checked before decoding, where file paths are read, and the messages a client gets."""

from __future__ import annotations

import base64
import io
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dtl import DTLError
from dtl.model.decode import InputPolicy, InvalidInput, decode_image_bytes, image_from_value, read_images, truthy

NOT_READ = " (file paths are not read: send the file's bytes base64-encoded)"
NOT_AN_IMAGE = "the input is not a readable image (expected PNG/JPEG/BMP/TIFF/GIF/WEBP bytes)"


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _message(excinfo) -> str:
    return excinfo.value.message


# --- truthy and the policy's model_config -------------------------------------------------------


@pytest.mark.parametrize("value", ["false", "False", "FALSE", "0", "no", "NO", "No", "off", "Off", " off ", "", "  ",
                                   False, 0, None])
def test_truthy_reads_the_documented_false_spellings_as_false(value):
    assert truthy(value) is False


@pytest.mark.parametrize("value", ["true", "True", "1", "yes", "on", "y", "paths", True, 1])
def test_truthy_reads_anything_else_as_true(value):
    assert truthy(value) is True


def test_input_policy_defaults_are_closed_to_paths_and_bound_bytes_and_pixels():
    default = InputPolicy()
    assert (default.allow_paths, default.max_bytes, default.max_pixels) == (False, 32 * 1024 * 1024, 40_000_000)
    assert InputPolicy.from_config(None) == InputPolicy.from_config({}) == default
    assert InputPolicy.from_config({"output": "class"}) == default  # keys of other settings are ignored


def test_input_policy_from_config_reads_each_key_and_string_values():
    assert InputPolicy.from_config({"allow_paths": True}) == InputPolicy(allow_paths=True)
    assert InputPolicy.from_config({"allow_paths": "false"}) == InputPolicy(allow_paths=False)
    # values given as strings (a CLI or an MLflow model_config from JSON) are parsed
    assert InputPolicy.from_config({"allow_paths": "yes", "max_image_bytes": "100", "max_image_pixels": "7"}) == \
        InputPolicy(True, 100, 7)
    assert InputPolicy.from_config({"max_image_bytes": 5}) == InputPolicy(max_bytes=5)
    assert InputPolicy.from_config({"max_image_pixels": 9}) == InputPolicy(max_pixels=9)


@pytest.mark.parametrize("policy", [InputPolicy(), InputPolicy(True, 100, 7), InputPolicy(False, 1, 2)])
def test_input_policy_model_config_names_the_keys_and_round_trips(policy):
    assert policy.model_config() == {"allow_paths": policy.allow_paths, "max_image_bytes": policy.max_bytes,
                                     "max_image_pixels": policy.max_pixels}
    assert InputPolicy.from_config(policy.model_config()) == policy


def test_invalid_input_is_an_http_400_mlflow_error_and_a_dtl_error():
    e = InvalidInput("input row 3: bad")
    assert isinstance(e, DTLError)
    assert e.error_code == "INVALID_PARAMETER_VALUE" and e.get_http_status_code() == 400
    assert e.message == str(e) == "input row 3: bad"


# --- arrays -------------------------------------------------------------------------------------


def test_array_pixel_bound_multiplies_height_by_width():
    tall = np.zeros((30, 5, 3), np.uint8)  # 150 pixels, though 5×5 would be 25
    with pytest.raises(InvalidInput) as e:
        image_from_value(tall, InputPolicy(max_pixels=100))
    assert _message(e) == "image of 5×30 pixels exceeds the limit of 100"
    wide = _rgb(10, 11)  # 110 pixels, the bound itself, though 11×11 would be 121
    assert np.array_equal(image_from_value(wide, InputPolicy(max_pixels=110)), wide)


def test_ragged_nested_list_names_the_expected_array():
    with pytest.raises(InvalidInput) as e:
        image_from_value([[1, 2], [3]])
    assert _message(e) == "an image array must be a rectangular H×W×3 array of numbers"


def test_greyscale_array_becomes_three_equal_channels():
    grey = np.array([[0, 7, 255], [1, 2, 3]], np.uint8)
    got = image_from_value(grey)
    assert got.shape == (2, 3, 3) and all(np.array_equal(got[..., c], grey) for c in range(3))


# --- bytes --------------------------------------------------------------------------------------


def test_png_bytes_decode_to_the_same_pixels():
    arr = _rgb(5, 7)
    assert np.array_equal(image_from_value(_png(arr)), arr)
    assert np.array_equal(image_from_value(bytearray(_png(arr))), arr)


def test_image_bytes_at_the_byte_limit_are_accepted_and_one_more_is_refused():
    data = _png(_rgb(4, 6))
    assert np.array_equal(decode_image_bytes(data, InputPolicy(max_bytes=len(data))), _rgb(4, 6))
    with pytest.raises(InvalidInput) as e:
        decode_image_bytes(data, InputPolicy(max_bytes=len(data) - 1))
    assert _message(e) == f"{len(data)} bytes of image data exceed the limit of {len(data) - 1}"


@pytest.mark.parametrize("data", [b"not an image at all", b"", _png(_rgb(3, 3), "PPM")])
def test_unreadable_or_unlisted_formats_are_refused_with_the_accepted_formats(data):
    """PPM is a format Pillow reads but the policy does not offer (only the listed decoders are
    reachable from user input)."""
    assert Image.open(io.BytesIO(_png(_rgb(3, 3), "PPM"))).format == "PPM"  # Pillow itself would read it
    with pytest.raises(InvalidInput) as e:
        decode_image_bytes(data)
    assert _message(e) == NOT_AN_IMAGE


# --- base64 strings -----------------------------------------------------------------------------


def test_base64_string_decodes_to_the_same_pixels():
    arr = _rgb(6, 4, seed=1)
    assert np.array_equal(image_from_value(_b64(_png(arr))), arr)


@pytest.mark.parametrize("max_bytes", [99, 100, 101])
def test_base64_length_bound_is_the_encoded_limit_plus_four(max_bytes):
    """The longest base64 of ``max_bytes`` bytes (4 characters per 3 bytes, padded), plus 4: a string
    that long still goes on to be decoded (here: refused as not base64), one character more is
    refused by its length before decoding."""
    bound = len(base64.b64encode(bytes(max_bytes))) + 4
    policy = InputPolicy(max_bytes=max_bytes)
    with pytest.raises(InvalidInput) as e:
        image_from_value("!" * bound, policy)
    assert _message(e) == f"'{'!' * 60}' is not base64 image bytes" + NOT_READ
    with pytest.raises(InvalidInput) as e:
        image_from_value("!" * (bound + 1), policy)
    assert _message(e) == f"base64 input of {bound + 1} characters decodes to more than {max_bytes} bytes"


def test_base64_of_an_image_at_the_byte_limit_is_accepted():
    data = _png(_rgb(3, 5))
    assert np.array_equal(image_from_value(_b64(data), InputPolicy(max_bytes=len(data))), _rgb(3, 5))


@pytest.mark.parametrize("junk", ["!", "\n", " ", "*"])
def test_base64_with_characters_outside_the_alphabet_is_refused(junk):
    """Not silently dropped: a corrupted string is an error, not some other image."""
    good = _b64(_png(_rgb(4, 4)))
    bad = good[:8] + junk + good[8:]
    with pytest.raises(InvalidInput) as e:
        image_from_value(bad)
    assert _message(e) == f"{bad[:60]!r} is not base64 image bytes" + NOT_READ


def test_not_base64_message_quotes_the_first_60_characters():
    with pytest.raises(InvalidInput) as e:
        image_from_value("@" * 100)
    assert _message(e) == "'" + "@" * 60 + "' is not base64 image bytes" + NOT_READ


def test_file_path_is_not_read_by_default(tmp_path):
    f = tmp_path / "cell.png"
    f.write_bytes(_png(_rgb(4, 4)))
    with pytest.raises(InvalidInput) as e:
        image_from_value(str(f))
    assert _message(e) == f"{str(f)[:60]!r} is not base64 image bytes" + NOT_READ


# --- file paths, when the policy allows them -----------------------------------------------------

PATHS = InputPolicy(allow_paths=True)


def test_allowed_path_of_a_regular_file_is_read_and_decoded(tmp_path):
    arr = _rgb(5, 6, seed=2)
    f = tmp_path / "cell.png"
    f.write_bytes(_png(arr))
    assert np.array_equal(image_from_value(str(f), PATHS), arr)


def test_allowed_path_at_the_byte_limit_is_read_and_one_byte_over_is_refused(tmp_path):
    arr = _rgb(4, 4, seed=3)
    f = tmp_path / "cell.png"
    f.write_bytes(_png(arr))
    size = f.stat().st_size
    assert np.array_equal(image_from_value(str(f), InputPolicy(True, size)), arr)
    with pytest.raises(InvalidInput) as e:
        image_from_value(str(f), InputPolicy(True, size - 1))
    assert _message(e) == f"{str(f)!r} has {size} bytes, over the limit of {size - 1}"


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="needs Linux procfs")
def test_allowed_path_reads_at_most_one_byte_over_the_limit_when_stat_reports_less():
    """procfs files report size 0 yet hold more (like a file that grows after the check): the read
    stops at ``max_bytes + 1`` bytes, which the byte bound then refuses."""
    assert os.stat("/proc/self/status").st_size == 0 and len(Path("/proc/self/status").read_bytes()) > 200
    with pytest.raises(InvalidInput) as e:
        image_from_value("/proc/self/status", InputPolicy(True, 100))
    assert _message(e) == "101 bytes of image data exceed the limit of 100"


def test_allowed_path_of_a_directory_or_device_is_refused(tmp_path):
    for path in [str(tmp_path)] + (["/dev/null"] if stat.S_ISCHR(os.stat("/dev/null").st_mode) else []):
        with pytest.raises(InvalidInput) as e:
            image_from_value(path, PATHS)
        assert _message(e) == f"{path!r} is not a regular file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.timeout(20)
def test_allowed_path_of_a_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    with pytest.raises(InvalidInput) as e:
        image_from_value(str(fifo), PATHS)
    assert _message(e) == f"{str(fifo)!r} is not a regular file"


def test_allowed_paths_still_read_base64_strings_short_and_long():
    small, noisy = _rgb(3, 3, seed=4), _rgb(64, 64, seed=5)
    long = _b64(_png(noisy))
    assert len(long) > 4096  # longer than any path: not looked up as a file
    assert np.array_equal(image_from_value(_b64(_png(small)), PATHS), small)
    assert np.array_equal(image_from_value(long, PATHS), noisy)


def test_allowed_paths_message_for_neither_a_file_nor_base64(tmp_path):
    missing = str(tmp_path / "no-such.png")
    with pytest.raises(InvalidInput) as e:
        image_from_value(missing, PATHS)
    assert _message(e) == f"{missing[:60]!r} is neither an existing file nor base64 image bytes"
    with pytest.raises(InvalidInput) as e:
        image_from_value("no such file", PATHS)
    assert _message(e) == "'no such file' is neither an existing file nor base64 image bytes"


# --- the MLflow input shapes --------------------------------------------------------------------

A, B = _rgb(3, 4, seed=10), _rgb(5, 2, seed=11)


def _same(got: list, want: list) -> bool:
    return len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))


def test_read_images_takes_the_image_column_of_a_dataframe_wherever_it_is():
    df = pd.DataFrame({"id": ["a", "b"], "image": [_b64(_png(A)), _b64(_png(B))]})
    assert _same(read_images(df), [A, B])
    assert _same(read_images(df[["image", "id"]]), [A, B])


def test_read_images_takes_the_first_column_of_a_dataframe_without_an_image_column():
    df = pd.DataFrame({"picture": [_b64(_png(A)), _b64(_png(B))], "note": ["x", "y"]})
    assert _same(read_images(df), [A, B])


def test_read_images_takes_the_image_key_of_a_dict_or_else_its_first_value():
    assert _same(read_images({"name": ["x"], "image": [_b64(_png(A))]}), [A])
    assert _same(read_images({"picture": [_b64(_png(B))], "name": ["x"]}), [B])
    # tensor-style input: a 1-D array of base64 strings
    assert _same(read_images({"image": np.array([_b64(_png(A)), _b64(_png(B))])}), [A, B])


def test_read_images_treats_a_3d_array_as_one_image_and_a_4d_array_as_a_batch():
    batch = np.stack([A, _rgb(3, 4, seed=12)])
    assert _same(read_images({"image": A}), [A])
    assert _same(read_images({"image": batch}), list(batch))
    assert _same(read_images(A), [A])
    assert _same(read_images(batch), list(batch))


def test_read_images_takes_lists_tuples_and_a_single_value():
    assert _same(read_images([_b64(_png(A)), _png(B)]), [A, B])
    assert _same(read_images((_png(B),)), [B])
    assert _same(read_images(_b64(_png(A))), [A])


def test_read_images_names_the_bad_row():
    with pytest.raises(InvalidInput) as e:
        read_images([_png(A), b"junk"])
    assert _message(e) == "input row 1: " + NOT_AN_IMAGE
