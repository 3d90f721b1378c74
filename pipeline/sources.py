"""Video decoders behind one interface (PyAV first, OpenCV as the fallback), keyed by name in DECODERS."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from pipeline.schema import SourceKind

logger = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """A source did not open, or stopped delivering frames; the message says which and why."""


@dataclass(frozen=True)
class SourceOptions:
    """How to open a source."""

    open_timeout_s: float = 5.0
    read_timeout_s: float = 5.0
    rtsp_transport: str = "tcp"


@dataclass
class DecodedFrame:
    """A decoded picture with its media time and its index in the source."""

    image: np.ndarray  # [height, width, 3] RGB uint8
    pts: float
    index: int


def local_path(url: str) -> str:
    """What decoders open for a URL: a filesystem path for file:// and device:// URLs, else the URL itself."""
    parts = urlsplit(url)
    if parts.scheme in ("file", "device"):
        return parts.path
    return url


class Decoder(ABC):
    """Opens one source and yields its frames; not thread-safe, owned by one reader thread."""

    name = ""

    def __init__(self, url: str, kind: SourceKind, options: SourceOptions) -> None:
        self.url = url
        self.kind = kind
        self.options = options

    @abstractmethod
    def open(self) -> None:
        """Connect; raises SourceError."""

    @abstractmethod
    def frames(self) -> Iterator[DecodedFrame]:
        """Frames until the end of a file; raises SourceError when a live source fails."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection."""


class PyAVDecoder(Decoder):
    """FFmpeg through PyAV: RTSP over TCP with timeouts, HTTP/HLS, files, V4L2 devices."""

    name = "pyav"

    def open(self) -> None:
        import av

        options: dict[str, str] = {}
        fmt = None
        if self.kind == "rtsp":
            options["rtsp_transport"] = self.options.rtsp_transport
            options["timeout"] = str(int(self.options.read_timeout_s * 1e6))  # socket timeout, microseconds
        elif self.kind == "device":
            fmt = "v4l2"
        try:
            self.container = av.open(local_path(self.url), format=fmt, options=options,
                                     timeout=(self.options.open_timeout_s, self.options.read_timeout_s))
            self.stream = self.container.streams.video[0]
        except (av.FFmpegError, OSError, IndexError) as exc:
            self.container = None
            raise SourceError(f"pyav cannot open {self.url}: {_one_line(exc)}") from None
        self.stream.thread_type = "AUTO"

    def frames(self) -> Iterator[DecodedFrame]:
        import av

        index = 0
        try:
            for frame in self.container.decode(self.stream):
                pts = float(frame.time) if frame.time is not None else index / float(self.stream.average_rate or 25)
                yield DecodedFrame(frame.to_ndarray(format="rgb24"), pts, index)
                index += 1
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"pyav lost {self.url} after {index} frames: {_one_line(exc)}") from None
        if index == 0:
            raise SourceError(f"{self.url} holds no decodable video frames")
        if self.kind != "file":
            raise SourceError(f"{self.url} ended after {index} frames")

    def close(self) -> None:
        container, self.container = getattr(self, "container", None), None
        if container is not None:
            container.close()


class OpenCVDecoder(Decoder):
    """OpenCV's VideoCapture (its own FFmpeg or V4L2 build): the fallback when PyAV cannot open a source."""

    name = "opencv"

    def open(self) -> None:
        import cv2

        target: str | int = local_path(self.url)
        if self.kind == "device":
            target = int(str(target).removeprefix("/dev/video"))
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.options.open_timeout_s * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.options.read_timeout_s * 1000)]
        self.cap = cv2.VideoCapture(target, cv2.CAP_ANY, params)
        if not self.cap.isOpened():
            self.cap.release()
            raise SourceError(f"opencv cannot open {self.url}")
        self.fps = float(self.cap.get(cv2.CAP_PROP_FPS) or 0) or 25.0

    def frames(self) -> Iterator[DecodedFrame]:
        import cv2

        index = 0
        start = time.monotonic()
        while True:
            ok, bgr = self.cap.read()
            if not ok:
                break
            pts_ms = self.cap.get(cv2.CAP_PROP_POS_MSEC)
            if self.kind == "file":
                pts = pts_ms / 1000.0 if pts_ms > 0 else index / self.fps
            else:
                pts = time.monotonic() - start
            yield DecodedFrame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), pts, index)
            index += 1
        if index == 0:
            raise SourceError(f"{self.url} holds no decodable video frames")
        if self.kind != "file":
            raise SourceError(f"opencv lost {self.url} after {index} frames")

    def close(self) -> None:
        cap, self.cap = getattr(self, "cap", None), None
        if cap is not None:
            cap.release()


DECODERS: dict[str, type[Decoder]] = {"pyav": PyAVDecoder, "opencv": OpenCVDecoder}


def open_source(url: str, kind: SourceKind, options: SourceOptions, order: list[str]) -> Decoder:
    """The first decoder in ``order`` that opens ``url``; SourceError lists why each one failed."""
    errors = []
    for name in order:
        if name not in DECODERS:
            raise ValueError(f"unknown decoder {name!r} (known: {', '.join(DECODERS)})")
        decoder = DECODERS[name](url, kind, options)
        try:
            decoder.open()
            return decoder
        except SourceError as exc:
            errors.append(str(exc))
    raise SourceError("; ".join(errors))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
