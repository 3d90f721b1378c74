"""The engine service's timeline from a real `valora` engine on the tiny checkpoint, drawn by the Engine page."""

from __future__ import annotations

import threading
import time

import torch

from engine.base import create_engine
from engine.config import EngineConfig
from engine.request import EngineRequest, ImageRef, SamplingParams
from pipeline.config import ServiceConfig
from pipeline.engine_client import ServiceClient
from pipeline.engine_service import EngineService
from pipeline.frames import encode_jpeg

from .conftest import frame_picture


def test_engine_service_publishes_the_timeline_the_engine_page_draws(tiny_checkpoint, transport, app):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on 2 shared cores
    engine = create_engine(EngineConfig(backend="valora", model=str(tiny_checkpoint / "base"),
                                        adapters=str(tiny_checkpoint / "adapters"), device="cpu", max_num_seqs=4))
    service = EngineService(transport, engine, ServiceConfig(), "timeline-engine")
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    client = ServiceClient(transport)
    try:
        jpeg = encode_jpeg(frame_picture()[0], 640, 85)[0]
        futures = [client.submit(EngineRequest(adapter=name, prompt="how many cars are there?",
                                               images=[ImageRef(id=f"f{i}", jpeg=jpeg)],
                                               sampling=SamplingParams(max_tokens=3)))
                   for i, name in enumerate(["ad8", "ad4", "ad8"])]
        results = [f.result(timeout=120) for f in futures]
        assert all(r.ok for r in results), [r.error for r in results]
        time.sleep(1.2)  # one more health refresh after the last result
    finally:
        stop.set()
        thread.join(30)
        client.close()
        engine.close()
        torch.set_num_threads(threads)
    ticks = transport.engine_ticks()
    assert ticks and {t.engine_id for t in ticks} == {"timeline-engine"}
    assert {t.backend for t in ticks} == {"valora"} and {t.mode for t in ticks} <= {"merged", "unmerged", "mixture"}
    assert all(isinstance(t.batch_size, int) and isinstance(t.waiting, int) for t in ticks)
    assert {"ad8", "ad4"} <= {name for t in ticks for name in t.adapters_resident or []}
    assert all(t.gpu_memory_mb is None for t in ticks)  # a CPU engine never initialises CUDA
    assert [t.ts for t in ticks] == sorted(t.ts for t in ticks)
    assert ticks[-1].served == 3

    app.switch_page("views/engine.py").run()
    assert not app.exception, app.exception
    assert [i.value for i in app.info] == ["Not reported: this engine runs without CUDA."]
    charts = [el for kind in ("arrow_vega_lite_chart", "vega_lite_chart") for el in app.get(kind)]
    assert len(charts) == 3  # mode and merged adapter, batch and queue, pool residency
    resident = next(c.value for c in app.caption if c.value.startswith("Resident now: "))
    assert set(resident.removeprefix("Resident now: ").split(", ")) == set(ticks[-1].adapters_resident)
