"""The core's loop (engine/core_process.CoreLoop) with two API processes, in this process over
inproc ZeroMQ sockets and the fake runner: each step's outputs go to the process that sent the
request, one message per process; stats go to both; the queue limit counts the requests of both;
ClientGone aborts the requests of the process that died and sends it nothing more."""

from __future__ import annotations

import zmq
from core_fakes import build_fake_core

from fitserve.engine.core_messages import (
    AbortRequests,
    AddRequest,
    ClientGone,
    RequestFailed,
    StepOutputs,
    from_core_codec,
    to_core_codec,
)
from fitserve.engine.core_process import CoreLoop
from fitserve.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


class Harness:
    """A CoreLoop over the fake engine; `send` plays the API processes, `received(i)` reads process i's socket."""

    def __init__(self, num_clients: int = 2, max_num_in_flight: int | None = None) -> None:
        self.context = zmq.Context()
        self.sender = self.context.socket(zmq.PUSH)
        self.sender.bind("inproc://to-core")
        inbox = self.context.socket(zmq.PULL)
        inbox.connect("inproc://to-core")
        self.readers, outboxes = [], []
        for index in range(num_clients):
            reader = self.context.socket(zmq.PULL)
            reader.bind(f"inproc://from-core-{index}")
            outbox = self.context.socket(zmq.PUSH)
            outbox.connect(f"inproc://from-core-{index}")
            self.readers.append(reader)
            outboxes.append(outbox)
        self.sockets = [self.sender, inbox, *self.readers, *outboxes]
        engine, _ = build_fake_core(None, False, max_num_seqs=8)
        self.engine = engine
        self.loop = CoreLoop(engine, inbox, outboxes, parent_pid=-1, max_num_in_flight=max_num_in_flight)
        self.encoder, _ = to_core_codec()
        _, self.decoder = from_core_codec()

    def send(self, *messages: object) -> None:
        for message in messages:
            self.sender.send(self.encoder.encode(message))
        assert self.loop._take_messages()

    def step(self) -> None:
        self.engine.step(deliver=self.loop._deliver)

    def received(self, index: int) -> list[object]:
        messages = []
        while self.readers[index].poll(0):
            messages.append(self.decoder.decode(self.readers[index].recv()))
        return messages

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        self.context.term()


def _add(request_id: str, prompt_id: int, client_index: int) -> AddRequest:
    return AddRequest(request_id, [prompt_id], PARAMS, 0.0, client_index)


def _request_ids(messages: list[object]) -> set[str]:
    return {o.request_id for m in messages if isinstance(m, StepOutputs) for o in m.outputs}


def test_each_process_gets_only_its_own_outputs_and_both_get_the_stats():
    harness = Harness()
    try:
        harness.send(_add("a", 5, 0), _add("b", 7, 1), _add("c", 9, 1))
        while harness.engine.has_unfinished:
            harness.step()
        first, second = harness.received(0), harness.received(1)
        assert _request_ids(first) == {"a"} and _request_ids(second) == {"b", "c"}
        assert all(len({o.request_id for o in m.outputs}) == len(m.outputs) for m in first + second)
        # the step that finished the requests sent its stats to both processes
        assert any(m.stats is not None for m in first) and any(m.stats is not None for m in second)
        assert harness.loop._owners == {}
    finally:
        harness.close()


def test_the_queue_limit_counts_the_requests_of_both_processes():
    harness = Harness(max_num_in_flight=2)
    try:
        harness.send(_add("a", 5, 0), _add("b", 7, 0), _add("c", 9, 1))
        refused = [m for m in harness.received(1) if isinstance(m, RequestFailed)]
        assert [(m.request_id, m.overloaded) for m in refused] == [("c", True)]
        harness.send(AbortRequests(["a"]))
        harness.send(_add("d", 11, 1))  # room again: taken
        assert not harness.received(1) and set(harness.loop._owners) == {"b", "d"}
    finally:
        harness.close()


def test_client_gone_aborts_that_processes_requests_and_sends_it_nothing_more():
    harness = Harness()
    try:
        harness.send(_add("a", 5, 0), _add("b", 7, 1))
        harness.step()
        harness.send(ClientGone(0))
        assert set(harness.loop._owners) == {"b"}
        harness.received(0)
        while harness.engine.has_unfinished:
            harness.step()
        assert harness.received(0) == []  # not even stats
        assert "b" in _request_ids(harness.received(1))
        assert harness.engine.stats().metrics.finished_total["abort"] == 1
        harness.send(_add("late", 3, 0))  # sent just before the process died: dropped
        assert not harness.engine.has_unfinished
    finally:
        harness.close()
