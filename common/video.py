"""Videos of play: GIF and MP4 files, and animated-GIF video summaries for TensorBoard.

* GIF needs only Pillow; MP4 (H.264) needs ``imageio-ffmpeg``, which ships its own ffmpeg
  binary. Both come with the ``video`` extra: ``pip install 'apex-dqn[video]'``.
* ``SummaryWriter.add_video`` imports ``moviepy.editor``, which moviepy 2 removed, so it
  silently logs nothing with a current moviepy. TensorBoard shows a video as an image
  summary holding an animated GIF (that is all ``add_video`` ever wrote);
  :func:`log_video` writes that summary itself, with Pillow.

Frames are uint8 arrays ``(T, H, W, 3)`` (RGB) or ``(T, H, W)`` (grayscale).
"""

from __future__ import annotations

import io
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

VIDEO_SUFFIXES = (".gif", ".mp4")


class VideoError(RuntimeError):
    """A video cannot be written: unknown format, bad frames, or a missing dependency."""


def check_video_path(path: str | os.PathLike) -> Path:
    """Refuse an unsupported file type or a missing encoder before any work is done."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise VideoError(
            f"cannot write {str(p)!r}: the video must end in {' or '.join(VIDEO_SUFFIXES)}"
        )
    if suffix == ".gif":
        _require("PIL", "Pillow")
    else:
        _require("imageio_ffmpeg", "imageio-ffmpeg")
    return p


def _require(module: str, package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise VideoError(f"{package} is not installed: pip install 'apex-dqn[video]'")


def gif_available() -> bool:
    """Whether GIFs (files and TensorBoard videos) can be encoded here (needs Pillow)."""
    import importlib.util

    return importlib.util.find_spec("PIL") is not None


def as_rgb(frames: Any) -> np.ndarray:
    """Frames as a contiguous uint8 ``(T, H, W, 3)`` array (grayscale repeated to RGB)."""
    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        raise VideoError(f"frames must be uint8, not {arr.dtype}")
    if arr.ndim == 3:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
        raise VideoError(
            f"frames must have shape (T, H, W, 3) or (T, H, W) with T >= 1, not {arr.shape}"
        )
    return np.ascontiguousarray(arr)


def encode_gif(frames: Any, fps: float) -> bytes:
    """An animated GIF that loops forever.

    GIF stores delays in hundredths of a second, and identical consecutive frames are
    stored once with their delays added, so the playing time is kept, not the frame count.
    """
    from PIL import Image

    if not fps > 0:
        raise VideoError(f"fps must be positive, not {fps}")
    rgb = as_rgb(frames)
    images = [Image.fromarray(f) for f in rgb]
    # Whole hundredths per frame that add up to the right total: 15 fps is 7, 6, 7, ...
    ends = np.rint(np.arange(1, len(rgb) + 1) * (100.0 / fps)).astype(np.int64)
    delays = np.diff(ends, prepend=0).clip(min=1) * 10
    buf = io.BytesIO()
    images[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=[int(d) for d in delays],
        loop=0,
    )
    return buf.getvalue()


def write_video(path: str | os.PathLike, frames: Any, fps: float = 15.0) -> Path:
    """Write ``frames`` to a ``.gif`` or ``.mp4`` file (chosen by the suffix)."""
    p = check_video_path(path)
    rgb = as_rgb(frames)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() == ".gif":
        p.write_bytes(encode_gif(rgb, fps))
        return p
    import imageio_ffmpeg

    # H.264 in yuv420p needs even sides: pad odd ones with a copy of the edge.
    _, h, w, _ = rgb.shape
    if h % 2 or w % 2:
        rgb = np.pad(rgb, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    writer = imageio_ffmpeg.write_frames(
        str(p), (rgb.shape[2], rgb.shape[1]), fps=fps, macro_block_size=1
    )
    writer.send(None)
    try:
        for frame in rgb:
            writer.send(frame)
    finally:
        writer.close()
    return p


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a ``.gif`` or ``.mp4`` file to uint8 ``(T, H, W, 3)`` frames.

    A GIF decodes to its stored frames (see :func:`encode_gif` on repeated frames).
    """
    p = Path(path)
    if p.suffix.lower() == ".gif":
        return decode_gif(p.read_bytes())
    if p.suffix.lower() != ".mp4":
        raise VideoError(f"cannot read {str(p)!r}: not a .gif or .mp4 file")
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(p))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(b, dtype=np.uint8).reshape(h, w, 3) for b in reader]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)


def decode_gif(data: bytes) -> np.ndarray:
    from PIL import Image, ImageSequence

    with Image.open(io.BytesIO(data)) as im:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])


def gif_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a GIF's logical screen descriptor."""
    if data[:6] not in (b"GIF87a", b"GIF89a"):
        raise VideoError("not a GIF")
    width, height = struct.unpack("<HH", data[6:10])
    return height, width


def video_summary(tag: str, gif: bytes) -> Any:
    """A TensorBoard ``Summary`` showing an animated GIF, as ``add_video`` would write."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    height, width = gif_size(gif)
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def log_video(
    writer: Any,
    tag: str,
    video: Any,
    global_step: int | None = None,
    fps: float = 15.0,
    walltime: float | None = None,
) -> None:
    """Log ``video`` (frames, or GIF bytes from :func:`encode_gif`) to a ``SummaryWriter``.

    The replacement for ``writer.add_video(tag, frames, step, fps)``; it shows in
    TensorBoard's Images tab.
    """
    gif = video if isinstance(video, bytes | bytearray) else encode_gif(video, fps)
    summary = video_summary(tag, bytes(gif))
    writer._get_file_writer().add_summary(
        summary, global_step, time.time() if walltime is None else walltime
    )
