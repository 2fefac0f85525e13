"""Calibration from an image folder: layout and size from the model, seeded subset, one-line errors."""
import numpy as np
import onnx
import pytest
from PIL import Image

from onnx_tucker.cli import main
from onnx_tucker.errors import DataError
from onnx_tucker.images import load_image_folder

from conftest import residual_model

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def make_folder(path, n=40, mode="RGB", size=(40, 30)):
    rng = np.random.default_rng(0)
    (path / "a" / "b").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
        sub = path / ("a" if i % 2 else "a/b")
        Image.fromarray(pixels, mode).save(sub / f"img{i:03d}.{'png' if i % 3 else 'jpg'}" if mode != "RGBA" else sub / f"img{i:03d}.png")
    return path


def test_nchw_model_gets_resized_scaled_channel_first_images(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    feeds = load_image_folder(folder, residual_model(), size=16, scale=1 / 255, mean=(0.5,), std=(0.25,))
    x = feeds["x"]
    assert x.shape == (16, 3, 10, 10) and x.dtype == np.float32
    assert -2.0 - 1e-6 <= x.min() and x.max() <= 2.0 + 1e-6  # (p/255 - 0.5) / 0.25
    again = load_image_folder(folder, residual_model(), size=16, scale=1 / 255, mean=(0.5,), std=(0.25,))
    np.testing.assert_array_equal(again["x"], x)  # seeded: the same subset


def test_nhwc_model_gets_raw_pixels_in_its_layout(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=5)
    model = onnx.load(str(ROOT / "models" / "cifar10_cnn.onnx"))
    x = load_image_folder(folder, model, size=64)["pixels"]
    assert x.shape == (5, 32, 32, 3) and 0 <= x.min() and x.max() <= 255  # all 5 (fewer than asked)


@pytest.mark.parametrize("setup, needle", [
    (lambda p: p.mkdir(), "holds no JPEG or PNG"),
    (lambda p: (p.mkdir(), (p / "bad.png").write_bytes(b"not an image")), "cannot read image"),
])
def test_bad_folders_are_one_line_errors(tmp_path, setup, needle):
    folder = tmp_path / "imgs"
    setup(folder)
    with pytest.raises(DataError, match=needle):
        load_image_folder(folder, residual_model(), size=8)


def test_cli_calibrates_from_a_folder_and_refuses_a_bad_one(tmp_path, capsys):
    src = tmp_path / "in.onnx"
    onnx.save(residual_model(), str(src))
    folder = make_folder(tmp_path / "imgs", n=64)
    assert main([str(src), str(tmp_path / "o.onnx"), "--ratio", "0.5", "--calibrate", str(folder), "--image-scale", "1/255",
                 "--max-rel-error", "10"]) == 0
    assert "fewer than the 2048 asked for: using all 64" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(src), str(tmp_path / "p.onnx"), "--calibrate", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no JPEG or PNG" in err and not (tmp_path / "p.onnx").exists()
    assert main([str(src), str(tmp_path / "q.onnx"), "--image-scale", "1/255"]) == 2


def test_a_folder_is_decoded_batch_by_batch_and_compresses_as_the_decoded_array(tmp_path, monkeypatch):
    """``--calibrate DIR`` streams (issue 15): no loop decodes more than a batch of images at once, and the
    measured budget, the fits and the refits give what the whole decoded array gives."""
    from onnx import numpy_helper

    from onnx_tucker import compress
    from onnx_tucker.images import ImageStream, stream_image_folder

    folder = make_folder(tmp_path / "imgs", n=150)
    model = residual_model()
    sizes = []
    whole = ImageStream.__array__

    def counted(self, dtype=None, copy=None):
        sizes.append(len(self))
        return whole(self, dtype, copy)
    monkeypatch.setattr(ImageStream, "__array__", counted)
    streamed = stream_image_folder(folder, model, size=150, scale=1 / 255)
    assert streamed["x"].decoded == 0 and streamed["x"].shape == (150, 3, 10, 10)  # headers only so far
    new_s, report_s = compress(model, target_macs=0.6, calibration=streamed)
    assert max(sizes) <= 64 < 150 and streamed["x"].decoded >= 3 * 150  # covariances, moments, refit...
    arrays = load_image_folder(folder, model, size=150, scale=1 / 255)
    new_a, report_a = compress(model, target_macs=0.6, calibration=arrays)
    assert [r.ranks for r in report_s.layers] == [r.ranks for r in report_a.layers]
    a = {i.name: numpy_helper.to_array(i) for i in new_a.graph.initializer}
    for init in new_s.graph.initializer:
        np.testing.assert_allclose(numpy_helper.to_array(init), a[init.name], rtol=1e-4, atol=1e-6)


def test_16_bit_grey_pngs_are_scaled_to_0_255_not_clipped(tmp_path):
    """PIL's convert("RGB") of an I;16 image clips every value above 255: a 16-bit scan became almost all 255."""
    folder = tmp_path / "png16"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 65536, (10, 10), dtype=np.uint16)).save(folder / f"{i}.png")
    with Image.open(folder / "0.png") as image:
        assert image.mode.startswith("I")
        raw = np.asarray(image, np.float64)
    x = load_image_folder(folder, residual_model(), size=4)["x"]  # 10x10: no resize
    first = x[0]
    np.testing.assert_allclose(first[0], raw * 255 / 65535, atol=0.02)
    assert np.array_equal(first[0], first[1]) and np.array_equal(first[1], first[2])  # grey -> RGB
    assert (x == 255).mean() < 0.01


@pytest.mark.parametrize("args, needle", [
    (["--image-mean", "1,2"], "--image-mean: 2 values for a 3-channel input: give 1 or 3"),
    (["--image-std", "1,2,3,4"], "--image-std: 4 values for a 3-channel input: give 1 or 3"),
    (["--image-scale", "inf"], "--image-scale: expected a positive finite number"),
    (["--image-scale", "0"], "--image-scale: expected a positive finite number"),
    (["--image-mean", "1/0"], "--image-mean: division by zero in '1/0'"),  # was an internal ZeroDivisionError
    (["--image-std", "1/0"], "--image-std: division by zero in '1/0'"),
    (["--image-std", "1,2/0,3"], "--image-std: division by zero in '1,2/0,3'"),
])
def test_preprocessing_flags_that_do_not_fit_are_usage_errors(tmp_path, capsys, args, needle):
    src = tmp_path / "in.onnx"
    onnx.save(residual_model(), str(src))
    folder = make_folder(tmp_path / "imgs", n=40)
    assert main([str(src), str(tmp_path / "o.onnx"), "--ratio", "0.5", "--calibrate", str(folder), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and not (tmp_path / "o.onnx").exists()


def test_a_folder_of_copies_is_refused_like_a_file_of_copies(tmp_path, capsys):
    folder = tmp_path / "copies"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(np.full((10, 10, 3), 40 * (i % 5), np.uint8)).save(folder / f"{i:02d}.png")
    src = tmp_path / "in.onnx"
    onnx.save(residual_model(), str(src))
    assert main([str(src), str(tmp_path / "o.onnx"), "--ratio", "0.5", "--calibrate", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "gives 40 images (5 distinct files): a data-aware fit needs at least 32 distinct samples" in err


def test_rgba_and_cmyk_images_feed_an_rgb_model_and_colour_is_refused_for_a_grey_one(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (10, 10, 4), dtype=np.uint8), "RGBA").save(folder / f"a{i}.png")
        Image.fromarray(rng.integers(0, 256, (10, 10, 4), dtype=np.uint8), "CMYK").save(folder / f"c{i}.jpg")
    x = load_image_folder(folder, residual_model(), size=6)["x"]
    assert x.shape == (6, 3, 10, 10)
    with Image.open(folder / "a0.png") as image:  # alpha dropped: the RGB values themselves
        np.testing.assert_array_equal(x[0], np.asarray(image.convert("RGB"), np.float32).transpose(2, 0, 1))
    grey = residual_model()
    grey.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1
    grey.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(
        onnx.numpy_helper.to_array(grey.graph.initializer[0])[:, :1].copy(), grey.graph.initializer[0].name))
    with pytest.raises(DataError, match="more channels than the model's 1"):
        load_image_folder(folder, grey, size=6)


def test_a_core_conv_reading_the_image_refits_from_a_streamed_folder(tmp_path):
    """The ``kxk -> 1x1`` stem chain (R_in = C_in: the core reads the image itself) refits its core on patches of the
    calibration images. From a folder those were an ImageStream the patches could not index: an internal error.
    Now it gives what the decoded array gives."""
    from onnx import numpy_helper

    from onnx_tucker import compress
    from onnx_tucker.chain import chains_of
    from onnx_tucker.images import stream_image_folder

    folder = make_folder(tmp_path / "imgs", n=64)
    model = residual_model(channels=16)
    ranks = {"stem": (8, 3)}
    new_s, _ = compress(model, ranks=ranks, calibration=stream_image_folder(folder, model, size=64, scale=1 / 255), force=True)
    new_a, _ = compress(model, ranks=ranks, calibration=load_image_folder(folder, model, size=64, scale=1 / 255), force=True)
    [chain] = [c for c in chains_of(new_s) if c.layer == "stem"]
    assert list(chain.nodes) == ["core", "last"]  # the core reads the graph input
    a = {i.name: numpy_helper.to_array(i) for i in new_a.graph.initializer}
    for init in new_s.graph.initializer:
        np.testing.assert_allclose(numpy_helper.to_array(init), a[init.name], rtol=1e-4, atol=1e-6)


def _cut(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("victim, keep", [("a/img001.png", 0.5), ("a/b/img000.jpg", 0.5), ("a/b/img000.jpg", 0.98)])
def test_an_image_cut_short_after_its_header_is_refused_before_any_decoding(tmp_path, victim, keep):
    """The README: an unreadable image is refused before any work. The check read headers only, so a file truncated
    after its header was caught only when a loop decoded it, with the work under way."""
    from onnx_tucker.images import stream_image_folder

    folder = make_folder(tmp_path / "imgs", n=40)
    model = residual_model()
    assert stream_image_folder(folder, model, size=40)["x"].decoded == 0  # the whole files pass the check
    _cut(folder / victim, keep)
    with pytest.raises(DataError) as info:
        stream_image_folder(folder, model, size=40)
    assert f"cannot read image {folder / victim}" in str(info.value) and "\n" not in str(info.value)


def test_the_completeness_check_refuses_no_valid_jpeg(tmp_path):
    """The JPEG check looks for the end-of-image marker after the first scan: trailing bytes, a thumbnail's own
    marker in APP1 and progressive scans are all fine; a cut primary image with a whole thumbnail before it is not."""
    from onnx_tucker.images import stream_image_folder

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    import io

    thumb = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(thumb, "JPEG")
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
            folder / f"{i}.jpg", "JPEG", progressive=bool(i % 2), exif=b"Exif\x00\x00" + thumb.getvalue())
    (folder / "0.jpg").write_bytes((folder / "0.jpg").read_bytes() + b"\x00" * 64 + b"trailing bytes")
    x = load_image_folder(folder, residual_model(), size=4)["x"]
    assert x.shape == (4, 3, 10, 10)
    _cut(folder / "1.jpg", 0.9)
    with pytest.raises(DataError, match="cannot read image .*1.jpg: image file is truncated"):
        stream_image_folder(folder, residual_model(), size=4)


def test_load_calibration_reads_an_image_folder_as_compress_calibrate_dir_does(tmp_path):
    """options' message says load_calibration reads a .npz file or an image folder; a folder was refused as
    'a folder, not a file'."""
    from onnx_tucker.data import load_calibration
    from onnx_tucker.errors import UsageError
    from onnx_tucker.images import ImageStream

    folder = make_folder(tmp_path / "imgs", n=40)
    model = residual_model()
    got = load_calibration(folder, model, size=16, image_scale=1 / 255, image_mean=0.5, image_std=[0.25])
    assert isinstance(got["x"], np.ndarray)
    decoded = load_image_folder(folder, model, size=16, scale=1 / 255, mean=(0.5,), std=(0.25,))["x"]
    np.testing.assert_array_equal(got["x"], decoded)
    streamed = load_calibration(folder, model, size=16, image_scale=1 / 255, image_mean=0.5, image_std=[0.25], stream=True)
    assert isinstance(streamed["x"], ImageStream) and streamed["x"].decoded == 0
    np.testing.assert_array_equal(np.asarray(streamed["x"]), got["x"])
    assert len(load_calibration(folder, model, size=None)["x"]) == 40
    with pytest.raises(DataError, match="holds 40 images, fewer than the 64 asked for"):
        load_calibration(folder, model, size=64)
    assert len(load_calibration(folder, model, size=64, strict_size=False)["x"]) == 40
    with pytest.raises(DataError, match="gives 40 images: a data-aware fit needs at least 48 distinct samples"):
        load_calibration(folder, model, size=None, min_samples=48)
    for bad in ({"image_scale": 0}, {"image_std": "x"}, {"image_mean": float("nan")}, {"size": 2.5}):
        with pytest.raises(UsageError):
            load_calibration(folder, model, **({"size": 16} | bad))


def test_a_file_that_is_no_image_is_named_in_the_message(tmp_path):
    """The check reads each file once (for the copies count too) and opens it from memory: PIL's message named the
    in-memory copy ('<_io.BytesIO object at ...>'), not the file."""
    folder = make_folder(tmp_path / "imgs", n=4)
    (folder / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\nGARBAGE")
    with pytest.raises(DataError) as info:
        load_image_folder(folder, residual_model(), size=8)
    assert str(info.value) == f"cannot read image {folder / 'zz.png'}: cannot identify image file (not a JPEG or PNG PIL can read)"


def test_a_png_with_a_bad_checksum_on_a_metadata_chunk_is_read_as_pil_reads_it(tmp_path):
    """The completeness check used PIL's verify, which checks every chunk's CRC: a tEXt chunk with a bad one after the
    image data (PIL decodes the file) refused the whole folder. Only what decoding needs is checked: the critical
    chunks, and that the chunks reach IEND; a bad CRC on the image data is still refused."""
    import io
    import struct
    import zlib

    from onnx_tucker.images import stream_image_folder

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
    good = buffer.getvalue()
    end = good.rindex(b"IEND") - 4
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(good[:end] + struct.pack(">I", 5) + b"tEXt" + b"a\x00bcd" + b"\x00" * 4 + good[end:])
    assert np.asarray(stream_image_folder(folder, residual_model(), size=1)["x"]).shape == (1, 3, 10, 10)
    idat = good.index(b"IDAT")
    length = int.from_bytes(good[idat - 4:idat], "big")
    crc = idat + 4 + length
    bad = good[:crc] + struct.pack(">I", zlib.crc32(b"nonsense")) + good[crc + 4:]
    (folder / "a.png").write_bytes(bad)
    with pytest.raises(DataError, match="bad checksum in chunk 'IDAT'"):
        stream_image_folder(folder, residual_model(), size=1)


def test_a_uint8_image_model_is_fed_rounded_pixels_from_a_folder(tmp_path, capsys):
    """A model taking uint8 pixels (convert keeps a Keras uint8 input) was fed float32 from --calibrate DIR: onnxruntime
    refused the type. The stream now gives the input's dtype, rounded and clipped."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((16, 3, 3, 3)).astype(np.float32)
    w2 = np.random.default_rng(1).standard_normal((16, 16, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT), helper.make_node("Conv", ["f", "W"], ["h"], pads=[1, 1, 1, 1], name="c1"),
         helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Conv", ["r", "W2"], ["y"], pads=[1, 1, 1, 1], name="c2")],
        "u8", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 3, 12, 12])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 12, 12])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w2, "W2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "u8.onnx"))
    folder = make_folder(tmp_path / "imgs")
    x = load_image_folder(folder, onnx.load(str(tmp_path / "u8.onnx")), size=8, scale=1.7)["x"]
    assert x.dtype == np.uint8 and x.max() == 255  # 255 * 1.7 clipped
    assert main([str(tmp_path / "u8.onnx"), str(tmp_path / "o.onnx"), "--ratio", "0.5", "--force", "--calibrate", str(folder)]) == 0
    assert "PASSED" in capsys.readouterr().out
