"""H.264 MP4 writing and reading through PyAV, for synthetic clips and the tests that check them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

logger = logging.getLogger(__name__)


class VideoWriter:
    """Writes RGB frames as H.264 (yuv420p) into an MP4; use as a context manager."""

    def __init__(self, path: Path, width: int, height: int, fps: float, crf: int = 18) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs even frame sizes, got {width}x{height}")
        self.path, self.width, self.height = Path(path), width, height
        self.rate = Fraction(fps).limit_denominator(1001)
        self._container = av.open(str(self.path), mode="w")
        self._stream = self._container.add_stream("libx264", rate=self.rate)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.time_base = 1 / self.rate
        # Bit-exact clips for a seed: x264's MB-tree rate control made the bitstream depend on heap contents
        # (measured: the same frames encoded differently after unrelated allocations), and threads on scheduling.
        self._stream.codec_context.thread_count = 1
        self._stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": "threads=1:no-mbtree=1"}
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        """Append one frame; rgb: [height, width, 3] uint8."""
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"expected a {self.height}x{self.width}x3 uint8 frame, got {rgb.shape} {rgb.dtype}")
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self.frames
        frame.time_base = 1 / self.rate
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        logger.debug("wrote %s frames to %s", self.frames, self.path)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        self.close()


def read_frames(path: Path) -> Iterator[np.ndarray]:
    """Decode every frame of a video as RGB; each: [height, width, 3] uint8."""
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")
