"""How the router reads a decode worker's final status: lost (try another worker) or the client's answer."""

from __future__ import annotations

import grpc
import pytest

from cluster.router_core import client_status, worker_lost


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_a_worker_that_dropped_the_call_is_lost_and_the_request_goes_elsewhere(code: grpc.StatusCode) -> None:
    # CANCELLED: the router's own cancel raises CancelledError, so a CANCELLED status came from the worker's
    # side (a tensor-parallel group dying mid-burst answered one once in CI, and the client saw it)
    assert worker_lost(code)
    assert client_status(code) == grpc.StatusCode.UNAVAILABLE  # when no other worker could take it


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED])
def test_a_worker_answer_about_the_request_reaches_the_client_as_it_is(code: grpc.StatusCode) -> None:
    assert not worker_lost(code)
    assert client_status(code) == code


def test_other_worker_failures_reach_the_client_as_unavailable() -> None:
    assert not worker_lost(grpc.StatusCode.INTERNAL)
    assert client_status(grpc.StatusCode.INTERNAL) == grpc.StatusCode.UNAVAILABLE
