"""A small Open Inference Protocol gRPC server for tests: what Triton would be behind predictor_host.

It runs a transformers model on the tensors it receives in raw_input_contents and answers the model's
first output in raw_output_contents, as Triton does. `ready` and `fail_next` let a test turn its
readiness off or make the next calls fail with UNAVAILABLE.
"""

from __future__ import annotations

from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

_NUMPY = {"INT64": np.int64, "INT32": np.int32}


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model_dir: Path, model_name: str) -> None:
        self.model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
        self.model_name = model_name
        self.ready = True
        self.fail_next = 0
        self.seen_inputs: list[str] = []
        self.calls = 0

    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> Any:
        return pb.ModelReadyResponse(ready=self.ready and request.name == self.model_name)

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if request.model_name != self.model_name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_name}")
        inputs = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            self.seen_inputs.append(tensor.name)
            array = np.frombuffer(raw, dtype=np.dtype(_NUMPY[tensor.datatype]).newbyteorder("<"))
            inputs[tensor.name] = torch.from_numpy(array.reshape(list(tensor.shape)).astype(np.int64))
        with torch.inference_mode():
            logits = self.model(**inputs).logits.numpy().astype("<f4")
        response = pb.ModelInferResponse(model_name=self.model_name, id=request.id)
        response.outputs.add(name="logits", datatype="FP32", shape=list(logits.shape))
        response.raw_output_contents.append(logits.tobytes())
        return response


def start(model_dir: Path, model_name: str, port: int) -> tuple[grpc.Server, OipServicer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = OipServicer(model_dir, model_name)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, servicer
