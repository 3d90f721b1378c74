"""File ingest against the clip's own ground truth, fault isolation between streams, and stopping while connecting."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from pipeline.frames import decode_jpeg
from pipeline.ingest import IngestManager, Ingestor
from pipeline.registry import StreamRegistry
from pipeline.transport import Keys

from .conftest import wait_for


def test_file_ingest_samples_and_attaches_scaled_truth(transport, clip, ingest_cfg):
    registry = StreamRegistry(transport, clip.parent)
    spec = registry.add({"id": "cam", "url": str(clip), "fps": 5})
    ingestor = Ingestor(spec, transport, registry, ingest_cfg.model_copy(update={"max_side": 112})).start()
    wait_for(lambda: ingestor.finished, 20, "the clip to be ingested")
    truth = {row["frame"]: row for row in map(json.loads, clip.with_suffix(".jsonl").read_text().splitlines())}
    entries = transport.client.xrange(Keys.frames("cam"))
    frames = [transport.decode_frame(fields) for _, fields in entries]
    # 3 s of 10 fps sampled at 5 fps: every second source frame.
    assert [f.source_frame for f in frames] == list(range(0, 30, 2))
    assert [f.seq for f in frames] == list(range(15))
    assert ingestor.health.state == "finished" and ingestor.health.frames_published == 15
    for frame in frames:
        image = decode_jpeg(transport.frame_jpeg(frame))
        assert image.shape == (112, 112, 3) and (frame.width, frame.height) == (112, 112)
        source = truth[frame.source_frame]
        assert frame.truth.counts == source["counts"] and frame.truth.caption == source["caption"]
        for obj, src in zip(frame.truth.objects, source["objects"], strict=True):
            assert obj.box == [v / 2 for v in src["box"]]
    health = transport.health_get("cam")
    assert health.state == "finished" and health.last_error is None


def test_bad_sources_fail_alone(transport, clip, ingest_cfg, tmp_path):
    media = clip.parent
    (media / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 500)
    outside = tmp_path / "elsewhere.mp4"
    outside.write_bytes(clip.read_bytes())
    registry = StreamRegistry(transport, media.parent)  # registration allowed a wider media dir than ingest does
    registry.add({"id": "good", "url": str(clip), "fps": 5})
    registry.add({"id": "corrupt", "url": str(media / "corrupt.mp4")})
    registry.add({"id": "unreachable", "url": "rtsp://127.0.0.1:1/cam"})
    registry.add({"id": "forbidden", "url": str(outside)})
    manager = IngestManager(transport, registry, ingest_cfg)
    stop = threading.Event()
    thread = threading.Thread(target=manager.run, args=(stop, 0.2), daemon=True)
    thread.start()
    try:
        wait_for(lambda: (h := transport.health_get("good")) and h.state == "finished", 20, "the good stream")
        wait_for(lambda: (h := transport.health_get("corrupt")) and h.state == "error", 20, "the corrupt file error")
        wait_for(lambda: (h := transport.health_get("unreachable")) and h.reconnects >= 2, 20, "reconnect attempts")
        wait_for(lambda: (h := transport.health_get("forbidden")) and h.state == "error", 20, "the forbidden file")
    finally:
        stop.set()
        thread.join(10)
    assert transport.health_get("good").frames_published == 15
    errors = {r.spec.id: r.error for r in registry.records()}
    assert errors["good"] is None
    assert "cannot open" in errors["corrupt"] and "corrupt.mp4" in errors["corrupt"]
    assert "127.0.0.1:1" in errors["unreachable"] and "refused" in errors["unreachable"].lower()
    assert "outside the allowed media directory" in errors["forbidden"]
    for stream_id in ("corrupt", "unreachable", "forbidden"):
        health = transport.health_get(stream_id)
        assert health.last_error == errors[stream_id] and health.frames_published == 0
        assert transport.client.xlen(Keys.frames(stream_id)) == 0
    assert transport.health_get("unreachable").state == "stopped"
    flat = transport.client.hgetall(Keys.health("corrupt"))  # what an operator sees with redis-cli HGETALL
    assert flat[b"state"] == b"error" and flat[b"last_error"].decode() == errors["corrupt"]


def test_stop_while_connecting(transport, clip, ingest_cfg):
    """A server that accepts and never answers keeps the decoder in its open call; stop still returns at once."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    registry = StreamRegistry(transport, clip.parent)
    spec = registry.add({"id": "hang", "url": f"rtsp://127.0.0.1:{port}/cam"})
    cfg = ingest_cfg.model_copy(update={"open_timeout_s": 30.0, "stall_timeout_s": 30.0})
    ingestor = Ingestor(spec, transport, registry, cfg).start()
    try:
        conn, _ = silent.accept()  # the decoder is connecting now
        time.sleep(0.3)
        assert ingestor.health.state == "connecting"
        started = time.monotonic()
        ingestor.stop()
        assert time.monotonic() - started < 2.0 and not ingestor.thread.is_alive()
        assert transport.health_get("hang").state == "stopped"
        conn.close()
    finally:
        silent.close()


def _http_server(directory: Path):
    """A real HTTP server on a free port serving ``directory``, in a daemon thread."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _hls_copy(clip: Path, out_dir: Path) -> Path:
    """The clip remuxed (no re-encode) into an HLS playlist with its MPEG-TS segments, by FFmpeg through PyAV."""
    import av

    playlist = out_dir / "index.m3u8"
    with av.open(str(clip)) as src, av.open(str(playlist), "w", format="hls", options={
            "hls_time": "1", "hls_list_size": "0", "hls_playlist_type": "vod"}) as out:
        video = src.streams.video[0]
        stream = out.add_stream_from_template(video)
        for packet in src.demux(video):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return playlist


@pytest.mark.parametrize("form", ["mp4", "hls"])
def test_http_source(transport, clip, ingest_cfg, tmp_path, form):
    """A clip served over HTTP (the MP4 itself, or an HLS playlist of it) is read as a live source: frames flow,
    and its end counts as a disconnect."""
    path = clip if form == "mp4" else _hls_copy(clip, tmp_path)
    server = _http_server(path.parent)
    registry = StreamRegistry(transport, clip.parent)
    sid = f"web-{form}"
    spec = registry.add({"id": sid, "url": f"http://127.0.0.1:{server.server_address[1]}/{path.name}", "fps": 5})
    assert spec.kind == "http" and spec.live
    ingestor = Ingestor(spec, transport, registry, ingest_cfg).start()
    try:
        wait_for(lambda: ingestor.health.reconnects >= 1, 20, f"the {form} clip to be read to its end")
        # HTTP delivers the clip faster than real time, and a live source keeps only its newest 8 decoded frames
        # when publishing falls behind (a busy CPU): what is certain is those 8 frames sampled at 5 of 10 fps.
        assert ingestor.health.frames_published >= 4
        frame = transport.latest_frame(sid)
        assert frame.truth is None and transport.frame_jpeg(frame)
    finally:
        ingestor.stop()
        server.shutdown()
