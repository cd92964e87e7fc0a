"""The committed generated code is exactly what proto/generate.py makes from proto/ today, and the
services import and carry the expected methods."""

from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_generated_code_is_reproducible(tmp_path: pathlib.Path) -> None:
    # In its own process: grpc_tools' bundled protoc segfaults on import once NIXL's and torch's
    # native libraries are loaded (as they are in this test process).
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    fresh = sorted(p for p in (tmp_path / "tandem").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert fresh, "nothing was generated"
    for path in fresh:
        committed = REPO / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is not committed: run python proto/generate.py"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} differs: run python proto/generate.py"
    committed_files = {p.relative_to(REPO) for p in (REPO / "tandem").rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts}
    assert committed_files == {p.relative_to(tmp_path) for p in fresh}, "stale generated files are committed"


def test_services_expose_their_methods() -> None:
    from tandem.v1 import inference_pb2, worker_pb2

    inference = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    assert {m.name for m in inference.methods} == {"Generate", "ListModels"}
    assert inference.methods_by_name["Generate"].server_streaming
    worker = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
    assert {m.name for m in worker.methods} == {"Generate", "Prefill", "Abort", "Status", "KVEvents"}
    assert inference_pb2.DESCRIPTOR.name == "tandem/v1/inference.proto"  # never a bare name aetcd also uses
    request = inference_pb2.GenerateRequest(text="hi", sampling=inference_pb2.SamplingParameters(max_tokens=4))
    assert inference_pb2.GenerateRequest.FromString(request.SerializeToString()) == request
    assert request.WhichOneof("input") == "text" and not request.sampling.HasField("temperature")
