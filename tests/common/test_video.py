"""Video files and TensorBoard video summaries round-trip: written, then decoded back."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("PIL")

from PIL import Image, ImageSequence

from apex_dqn.common.video import (
    VideoError,
    check_video_path,
    decode_gif,
    encode_gif,
    gif_size,
    log_video,
    read_video,
    write_video,
)


def distinct_frames(t: int, h: int = 42, w: int = 32) -> np.ndarray:
    """RGB frames with a moving white square: each differs from the one before."""
    frames = np.zeros((t, h, w, 3), dtype=np.uint8)
    frames[..., 2] = 60
    for i in range(t):
        y, x = (2 * i) % (h - 4), (3 * i) % (w - 4)
        frames[i, y : y + 4, x : x + 4] = 255
    return frames


def test_gif_decodes_to_every_frame_with_exact_colours(tmp_path):
    frames = distinct_frames(23)
    path = write_video(tmp_path / "a.gif", frames, fps=15)
    back = read_video(path)
    assert back.shape == frames.shape
    np.testing.assert_array_equal(back, frames)  # two colours survive the palette exactly


def test_gif_keeps_the_playing_time():
    gif = encode_gif(distinct_frames(30), fps=15)
    with Image.open(io.BytesIO(gif)) as im:
        delays = [f.info["duration"] for f in ImageSequence.Iterator(im)]
    assert len(delays) == 30
    assert sum(delays) == 2_000  # 30 frames at 15 fps: 2 s, in whole hundredths
    assert set(delays) == {60, 70}


def test_gif_stores_a_repeated_frame_once_and_adds_its_delay():
    frames = distinct_frames(4)
    frames = np.concatenate([frames[:2], frames[1:2], frames[2:]])  # frame 1 shown twice
    gif = encode_gif(frames, fps=10)
    with Image.open(io.BytesIO(gif)) as im:
        delays = [f.info["duration"] for f in ImageSequence.Iterator(im)]
    assert delays == [100, 200, 100, 100]


def test_grayscale_frames_become_rgb(tmp_path):
    gray = distinct_frames(5)[..., 0]
    back = read_video(write_video(tmp_path / "g.gif", gray, fps=15))
    assert back.shape == (5, 42, 32, 3)
    np.testing.assert_array_equal(back[..., 0], gray)
    np.testing.assert_array_equal(back[..., 1], gray)


def test_mp4_decodes_to_the_same_number_of_frames(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    frames = distinct_frames(31, h=210, w=160)
    path = write_video(tmp_path / "a.mp4", frames, fps=15)
    back = read_video(path)
    assert back.shape == frames.shape
    # Lossy, but the picture is still there: the moving square is where it was drawn.
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 8


def test_mp4_pads_odd_sides(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    back = read_video(write_video(tmp_path / "odd.mp4", distinct_frames(3, h=21, w=17)))
    assert back.shape == (3, 22, 18, 3)


def test_bad_paths_and_frames_are_refused(tmp_path):
    with pytest.raises(VideoError, match=r"must end in \.gif or \.mp4"):
        check_video_path(tmp_path / "a.avi")
    with pytest.raises(VideoError, match="uint8"):
        encode_gif(np.zeros((2, 4, 4, 3), np.float32), fps=15)
    with pytest.raises(VideoError, match="shape"):
        encode_gif(np.zeros((0, 4, 4, 3), np.uint8), fps=15)


def test_log_video_writes_an_animated_gif_tensorboard_reads(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import (
        IMAGES,
        EventAccumulator,
    )
    from torch.utils.tensorboard import SummaryWriter

    frames = distinct_frames(12)
    writer = SummaryWriter(str(tmp_path))
    log_video(writer, "eval/video", frames, global_step=40_000, fps=15)
    log_video(writer, "eval/video", encode_gif(frames[:5], 15), global_step=80_000)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={IMAGES: 0})
    acc.Reload()
    assert "eval/video" in acc.Tags()["images"]
    events = acc.Images("eval/video")
    assert [e.step for e in events] == [40_000, 80_000]
    assert (events[0].height, events[0].width) == (42, 32)
    np.testing.assert_array_equal(decode_gif(events[0].encoded_image_string), frames)
    assert len(decode_gif(events[1].encoded_image_string)) == 5


def test_gif_size_reads_the_header():
    assert gif_size(encode_gif(distinct_frames(2, h=30, w=20), 15)) == (30, 20)
    with pytest.raises(VideoError):
        gif_size(b"\x89PNG\r\n\x1a\n" + bytes(8))
