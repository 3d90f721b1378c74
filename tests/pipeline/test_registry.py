"""Stream specs: validation rules, the registry, `valora streams`, and the token-guarded HTTP API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from pipeline.api import StreamsApi
from pipeline.cli import main
from pipeline.registry import SpecError, StreamRegistry, parse_spec


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://cam.local/x", "url scheme 'ftp' is not allowed"),
    ("gopher://x", "url scheme 'gopher' is not allowed"),
    ("file:///etc/passwd", "outside the allowed media directory"),
    ("/dev/sda", "outside the allowed media directory"),
    ("device:///dev/sda", "device url must name /dev/videoN"),
    ("rtsp:///nohost", "has no host"),
])
def test_refuses_urls(tmp_path, url, message):
    with pytest.raises(SpecError, match=message):
        parse_spec({"id": "cam", "url": url}, tmp_path)


def test_file_under_media_dir_cannot_escape(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (tmp_path / "secret.mp4").write_bytes(b"x")
    (media / "link.mp4").symlink_to(tmp_path / "secret.mp4")
    with pytest.raises(SpecError, match="outside"):
        parse_spec({"id": "a", "url": str(media / ".." / "secret.mp4")}, media)
    with pytest.raises(SpecError, match="outside"):
        parse_spec({"id": "a", "url": str(media / "link.mp4")}, media)
    spec = parse_spec({"id": "a", "url": str(media / "clip.mp4"), "loop": True}, media)
    assert spec.kind == "file" and spec.url == f"file://{media.resolve()}/clip.mp4" and spec.max_frame_age_s is None


def test_kinds_defaults_and_bounds(tmp_path):
    rtsp = parse_spec({"id": "gate-1", "url": "rtsp://10.0.0.5:554/stream", "tasks": {"vqa": {"fps": 1}}}, tmp_path)
    assert rtsp.kind == "rtsp" and rtsp.live and rtsp.max_frame_age_s == 5.0 and rtsp.task_fps("vqa") == 1
    assert parse_spec({"id": "w", "url": "/dev/video0"}, tmp_path).url == "device:///dev/video0"
    assert parse_spec({"id": "h", "url": "https://x/live.m3u8"}, tmp_path).kind == "http"
    for bad, message in [
        ({"fps": 0}, "fps: Input should be greater than or equal to 0.1"),
        ({"fps": 120}, "fps: Input should be less than or equal to 60"),
        ({"tasks": {"ocr": {}}}, "unknown task(s) ocr"),
        ({"tasks": {"vqa": {"fps": 10}}, "fps": 5}, "exceeds the stream's fps"),
        ({"loop": True}, "loop applies to file sources only"),
        ({"id": "Has Space"}, "must match"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ]:
        with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_spec({"id": "cam", "url": "rtsp://h/x"} | bad, tmp_path)


def test_registry_crud(transport, tmp_path):
    registry = StreamRegistry(transport, tmp_path)
    registry.add({"id": "cam", "url": "rtsp://h/x", "tasks": {"detection": {}}})
    with pytest.raises(SpecError, match="already exists"):
        registry.add({"id": "cam", "url": "rtsp://h/y"})
    updated = registry.update("cam", {"fps": 2, "tasks": {"counting": {"fps": 1}}})
    assert updated.fps == 2 and list(updated.tasks) == ["counting"]
    with pytest.raises(SpecError, match="scheme 'ftp'"):
        registry.update("cam", {"url": "ftp://h/x"})
    assert registry.get("cam").url == "rtsp://h/x"  # a refused update changes nothing
    registry.set_error("cam", "boom")
    assert [(r.spec.id, r.error) for r in registry.records()] == [("cam", "boom")]
    registry.remove("cam")
    assert registry.specs() == [] and registry.error("cam") is None


def run_cli(capsys, monkeypatch, redis_url, tmp_path, *argv):
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("VALORA_INGEST__MEDIA_DIR", str(tmp_path))
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_streams_cli(capsys, monkeypatch, redis_url, tmp_path):
    code, out, _ = run_cli(capsys, monkeypatch, redis_url, tmp_path, "streams", "add", "gate", "rtsp://cam/1",
                           "--fps", "4", "--task", "detection@2", "--task", "vqa", "--param",
                           'vqa.questions=["is there a bus?"]')
    assert code == 0 and "added gate" in out
    code, out, _ = run_cli(capsys, monkeypatch, redis_url, tmp_path, "streams", "list", "--json")
    (row,) = json.loads(out)
    assert row["spec"]["tasks"] == {"detection": {"fps": 2.0, "params": {}},
                                    "vqa": {"fps": None, "params": {"questions": ["is there a bus?"]}}}
    for argv, message in [
        (["add", "bad", "ftp://cam/1"], "url scheme 'ftp' is not allowed"),
        (["add", "bad", "rtsp://cam/1", "--fps", "500"], "fps: Input should be less than or equal to 60"),
        (["add", "bad", "rtsp://cam/1", "--task", "ocr"], "unknown task(s) ocr"),
        (["add", "bad", "rtsp://cam/1", "--task", "vqa", "--param", "vqa.nope=1"], "unknown vqa parameter"),
        (["add", "gate", "rtsp://cam/2"], "already exists"),
        (["update", "missing", "--fps", "2"], "no stream 'missing'"),
        (["rm", "missing"], "no stream 'missing'"),
    ]:
        code, _, err = run_cli(capsys, monkeypatch, redis_url, tmp_path, "streams", *argv)
        assert code == 1 and message in err, err
        assert err.count("\n") == 1 and err.startswith("valora streams: error: ")
    code, out, _ = run_cli(capsys, monkeypatch, redis_url, tmp_path, "streams", "rm", "gate")
    assert code == 0 and "removed gate" in out


def test_cli_unreachable_redis(capsys, monkeypatch, tmp_path):
    code, _, err = run_cli(capsys, monkeypatch, "redis://127.0.0.1:1/0", tmp_path, "streams", "list")
    assert code == 1 and err.startswith("valora streams: error: cannot reach Redis at redis://127.0.0.1:1/0")


def call(api: StreamsApi, method: str, path: str, body=None, token: str | None = "s3cret"):
    req = urllib.request.Request(api.url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_api(transport, tmp_path):
    with pytest.raises(ValueError, match="needs a token"):
        StreamsApi(StreamRegistry(transport, tmp_path), "")
    api = StreamsApi(StreamRegistry(transport, tmp_path), "s3cret").start()
    try:
        assert call(api, "GET", "/streams", token=None)[0] == 401
        assert call(api, "GET", "/streams", token="wrong")[0] == 401
        status, body = call(api, "POST", "/streams", {"id": "cam", "url": "rtsp://h/1", "tasks": {"counting": {}}})
        assert status == 201 and body["kind"] == "rtsp"
        status, body = call(api, "POST", "/streams", {"id": "bad", "url": "ftp://h/1"})
        assert status == 400 and "url scheme 'ftp' is not allowed" in body["error"]
        status, body = call(api, "POST", "/streams", {"id": "bad", "url": "rtsp://h/1", "fps": -1})
        assert status == 400 and "fps: Input should be greater than or equal to 0.1" in body["error"]
        status, body = call(api, "PATCH", "/streams/cam", {"fps": 2})
        assert status == 200 and body["fps"] == 2
        status, body = call(api, "GET", "/streams/cam")
        assert status == 200 and body["spec"]["fps"] == 2 and body["error"] is None
        assert call(api, "GET", "/streams/nope")[0] == 404
        assert [r["spec"]["id"] for r in call(api, "GET", "/streams")[1]] == ["cam"]
        assert call(api, "DELETE", "/streams/cam") == (200, {"removed": "cam"})
        assert call(api, "DELETE", "/streams/cam")[0] == 404
    finally:
        api.stop()
