"""The double's Nomad event stream as Nomad v1.10.5 serves it: ndjson frames with
their index, a heartbeat, topic filters, resuming at an index, a cut stream, a lost frame."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.doubles.fixture import Hashistack, served
from tests.harness import free_port_range

pytestmark = pytest.mark.timeout(60)
JOB = "e-acme-evt-0123456789ab"
WAIT_S = 10.0


def sleeper_job(job_id: str) -> dict[str, Any]:
    return {"Job": {"ID": job_id, "Name": job_id, "Type": "service", "Datacenters": ["*"],
                    "TaskGroups": [{"Name": "g", "Count": 1,
                                    "RestartPolicy": {"Attempts": 0, "Mode": "fail"},
                                    "Tasks": [{"Name": "t", "Driver": "raw_exec",
                                               "Config": {"command": "/bin/sleep",
                                                          "args": ["60"]}}]}]}}


class Stream:
    """Reads /v1/event/stream on a thread; each line parsed into `lines`, None at its end."""

    def __init__(self, stack: Hashistack, query: str, headers: dict[str, str] | None = None):
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.client = httpx.Client(timeout=httpx.Timeout(WAIT_S, read=None), trust_env=False)
        self.response = self.client.send(
            self.client.build_request("GET", f"{stack.nomad}/v1/event/stream?{query}",
                                      headers=headers), stream=True)
        if self.response.status_code == 200:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.response.iter_lines():
                if line:
                    self.lines.put(json.loads(line))
        except httpx.HTTPError:
            pass
        self.lines.put(None)

    def next(self, skip_heartbeats: bool = True) -> dict[str, Any] | None:
        while True:
            line = self.lines.get(timeout=WAIT_S)
            if line != {} or not skip_heartbeats:
                return line

    def until(self, pred: Any) -> dict[str, Any]:
        while True:
            frame = self.next()
            assert frame is not None, "the stream ended"
            if pred(frame):
                return frame

    def close(self) -> None:
        self.response.close()
        self.client.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hashistack]:
    # dev timing: these tests are about behaviour, not waits (test_double_timing.py
    # covers the production client's)
    with served(tmp_path_factory.mktemp("events"), free_port_range(4), nodes=1,
               dev=True) as hs:
        yield hs


def _status(alloc_id: str, status: str) -> Any:
    return lambda f: any(e["Key"] == alloc_id and e["Payload"]["Allocation"]["ClientStatus"]
                         == status for e in f["Events"])


def test_frames_heartbeats_filters_and_resume_at_an_index(stack: Hashistack) -> None:
    stack.fault(event_heartbeat_s=0.2)
    stream = Stream(stack, "topic=Allocation&topic=Job")
    try:
        assert stream.next(skip_heartbeats=False) == {}   # ndjson.go: a heartbeat at once
        assert httpx.put(f"{stack.nomad}/v1/jobs", json=sleeper_job(JOB)).status_code == 200
        job_frame = stream.until(lambda f: f["Events"][0]["Topic"] == "Job")
        event = job_frame["Events"][0]
        assert (event["Type"], event["Key"], event["Index"]) == ("JobRegistered", JOB,
                                                                 job_frame["Index"])
        placed = stream.until(lambda f: f["Events"][0]["Topic"] == "Allocation")
        alloc = placed["Events"][0]["Payload"]["Allocation"]
        assert placed["Events"][0]["Type"] == "PlanResult" and alloc["Job"] is None
        assert JOB in placed["Events"][0]["FilterKeys"]
        running = stream.until(_status(alloc["ID"], "running"))
        assert running["Index"] > placed["Index"]
        beats = [stream.next(skip_heartbeats=False) for _ in range(2)]
        assert beats == [{}, {}]                            # quiet: heartbeats only
    finally:
        stream.close()
    # StartAtClosest: at an index still in the buffer, that very frame comes first
    again = Stream(stack, f"topic=Allocation:{JOB}&index={running['Index']}")
    other = Stream(stack, f"topic=Allocation:e-other-000000000000&index={placed['Index']}")
    try:
        assert again.next() == running
        other_first = other.lines.get(timeout=WAIT_S)
        assert other_first == {}   # a key no event carries: nothing but heartbeats
        assert other.next(skip_heartbeats=False) == {}
    finally:
        again.close()
        other.close()
    past = Stream(stack, "index=999999999")   # past the newest frame: that one, sent again
    try:
        newest = past.next()
        assert newest is not None and newest["Index"] >= running["Index"]
    finally:
        past.close()
    httpx.delete(f"{stack.nomad}/v1/job/{JOB}?purge=true")


def test_a_cut_stream_resumes_from_its_index_and_a_lost_frame_is_gone(stack: Hashistack) -> None:
    job = JOB.replace("evt", "cut")
    stream = Stream(stack, f"topic=Allocation:{job}")
    httpx.put(f"{stack.nomad}/v1/jobs", json=sleeper_job(job))
    alloc_id = stream.until(lambda f: True)["Events"][0]["Key"]
    last = stream.until(_status(alloc_id, "running"))["Index"]
    stack.drop_event_streams()
    assert _ended(stream)
    stream.close()
    httpx.delete(f"{stack.nomad}/v1/job/{job}")          # happens while nobody listens
    resumed = Stream(stack, f"topic=Allocation:{job}&index={last + 1}")
    try:
        assert resumed.until(_status(alloc_id, "complete"))["Index"] > last
        stack.fault(lose_events=2)   # JobRegistered's frame, then PlanResult's
        before = int(httpx.get(f"{stack.nomad}/v1/jobs").headers["X-Nomad-Index"])
        httpx.put(f"{stack.nomad}/v1/jobs", json=sleeper_job(job))   # placed: its frame is lost
        placed = resumed.until(lambda f: f["Events"][0]["Key"] != alloc_id)
        assert placed["Events"][0]["Type"] == "AllocationUpdated"     # PlanResult never came
        assert placed["Index"] > before + 1
        assert stack.fault()["lose_events"] == 0
    finally:
        resumed.close()
        httpx.delete(f"{stack.nomad}/v1/job/{job}?purge=true")


def _ended(stream: Stream) -> bool:
    while True:
        if stream.next() is None:
            return True


def test_bad_queries_and_acls_are_refused_before_streaming(stack: Hashistack) -> None:
    bad = httpx.get(f"{stack.nomad}/v1/event/stream?index=abc")
    assert bad.status_code == 400 and "Unable to parse index" in bad.text
    bad = httpx.get(f"{stack.nomad}/v1/event/stream?topic=Job:a:b")
    assert bad.status_code == 400 and "Invalid topic query" in bad.text
    stack.acl({"jobs-only": {"namespace": ["read-job"]}})
    try:
        headers = {"X-Nomad-Token": "jobs-only"}
        refused = Stream(stack, "topic=Node", headers)
        assert refused.response.status_code == 403
        refused.close()
        allowed = Stream(stack, "topic=Allocation", headers)
        assert allowed.response.status_code == 200
        allowed.close()
    finally:
        stack.acl(None)
