"""A model that runs elsewhere: tokenizer tensors go to a remote Open Inference Protocol (V2) predictor.

As KServe's `predictor_host`: this server tokenizes and post-processes; a V2 server such as Triton
runs the forward pass and answers with the model's first output (logits, or hidden states for
embeddings). Two transports, chosen by `predictor_protocol`: `v2` (REST, JSON tensors) and `grpc-v2`
(GRPCInferenceService with binary tensors in raw_input_contents / raw_output_contents). Both honour
KServe's predictor_use_ssl, predictor_request_timeout_seconds and predictor_request_retries; with
enable_predictor_health_check a background thread asks the predictor whether the model is ready.
Called from the batcher thread, so blocking clients are the right tools.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod

import grpc
import httpx
import numpy as np
import torch
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from handlers.errors import ServingError
from settings.arguments import ServerArguments

logger = logging.getLogger(__name__)

_DATATYPES = {np.dtype("int64"): "INT64", np.dtype("int32"): "INT32"}
_NUMPY = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
# gRPC statuses worth another attempt: the predictor is down, restarting or overloaded.
_RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}


class RemotePredictorError(ServingError):
    status_code = 502
    error_type = "bad_gateway"


class _Retryable(Exception):
    """A failure another attempt may cure (connection refused, 5xx, UNAVAILABLE)."""


class RemotePredictor(ABC):
    """One remote model: `infer` sends tensors and returns its first output; `healthy` its last readiness."""

    def __init__(self, input_names: list[str] | None, retries: int = 0) -> None:
        self.input_names = input_names
        self.retries = retries
        self.healthy = True
        self._watching = threading.Event()

    def _arrays(self, model_inputs: dict[str, torch.Tensor]) -> list[tuple[str, np.ndarray]]:
        return [
            (name, np.ascontiguousarray(tensor.cpu().numpy()))
            for name, tensor in model_inputs.items()
            if not self.input_names or name in self.input_names
        ]

    def infer(self, model_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        arrays = self._arrays(model_inputs)
        for attempt in range(self.retries + 1):
            try:
                return torch.from_numpy(self._infer_once(arrays))
            except _Retryable as error:
                if attempt == self.retries:
                    raise RemotePredictorError(f"remote predictor {self.target} failed: {error}") from None
                logger.warning("remote predictor %s: %s; retry %d of %d", self.target, error, attempt + 1, self.retries)
                time.sleep(min(0.1 * 2**attempt, 2.0))
        raise AssertionError("unreachable")

    def watch(self, interval_s: float = 5.0) -> None:
        """Check readiness now and then every `interval_s` on a daemon thread (enable_predictor_health_check)."""
        self.healthy = self._check()
        self._watching.set()

        def loop() -> None:
            while self._watching.is_set():
                time.sleep(interval_s)
                self.healthy = self._check()

        threading.Thread(target=loop, name="predictor-health", daemon=True).start()

    def _check(self) -> bool:
        try:
            ready = self.is_ready()
        except Exception as error:  # any failure means "not ready"; the next check may succeed
            logger.warning("remote predictor %s health check failed: %s", self.target, error)
            return False
        if not ready:
            logger.warning("remote predictor %s: model not ready", self.target)
        return ready

    @property
    @abstractmethod
    def target(self) -> str: ...

    @abstractmethod
    def _infer_once(self, arrays: list[tuple[str, np.ndarray]]) -> np.ndarray: ...

    @abstractmethod
    def is_ready(self) -> bool: ...

    def close(self) -> None:
        self._watching.clear()


class RemoteV2Predictor(RemotePredictor):
    """V2 over REST, tensors as JSON."""

    def __init__(
        self,
        host: str,
        model_name: str,
        input_names: list[str] | None,
        timeout_s: float = 600,
        *,
        use_ssl: bool = False,
        retries: int = 0,
    ) -> None:
        super().__init__(input_names, retries)
        scheme = "https" if use_ssl else "http"
        base = host if host.startswith(("http://", "https://")) else f"{scheme}://{host}"
        self.model_url = f"{base.rstrip('/')}/v2/models/{model_name}"
        self.url = f"{self.model_url}/infer"
        self._client = httpx.Client(timeout=timeout_s)

    @property
    def target(self) -> str:
        return self.url

    def _infer_once(self, arrays: list[tuple[str, np.ndarray]]) -> np.ndarray:
        tensors = [
            {"name": name, "shape": list(a.shape), "datatype": _DATATYPES[a.dtype], "data": a.flatten().tolist()}
            for name, a in arrays
        ]
        try:
            response = self._client.post(self.url, json={"inputs": tensors})
        except httpx.HTTPError as error:
            raise _Retryable(f"{type(error).__name__}: {error}") from None
        if response.status_code >= 500:
            raise _Retryable(f"answered {response.status_code}: {response.text[:500]}")
        if response.status_code != 200:
            raise RemotePredictorError(
                f"remote predictor {self.url} answered {response.status_code}: {response.text[:500]}"
            )
        output = response.json()["outputs"][0]
        return np.asarray(output["data"], dtype=_NUMPY.get(output["datatype"], np.float32)).reshape(output["shape"])

    def is_ready(self) -> bool:
        return self._client.get(f"{self.model_url}/ready").status_code == 200

    def close(self) -> None:
        super().close()
        self._client.close()


class GrpcV2Predictor(RemotePredictor):
    """V2 over gRPC (KServe's `grpc-v2`), tensors as raw little-endian bytes both ways."""

    def __init__(
        self,
        host: str,
        model_name: str,
        input_names: list[str] | None,
        timeout_s: float = 600,
        *,
        use_ssl: bool = False,
        retries: int = 0,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        super().__init__(input_names, retries)
        self.host = host.split("://", 1)[-1].rstrip("/")
        self.model_name = model_name
        self.timeout_s = timeout_s
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if use_ssl:
            self._channel = grpc.secure_channel(self.host, grpc.ssl_channel_credentials(), options=options)
        else:
            self._channel = grpc.insecure_channel(self.host, options=options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    @property
    def target(self) -> str:
        return f"grpc://{self.host} (model {self.model_name})"

    def _infer_once(self, arrays: list[tuple[str, np.ndarray]]) -> np.ndarray:
        request = pb.ModelInferRequest(model_name=self.model_name)
        for name, array in arrays:
            request.inputs.add(name=name, datatype=_DATATYPES[array.dtype], shape=list(array.shape))
            request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        try:
            response = self._stub.ModelInfer(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            message = f"{code.name}: {error.details()}"  # type: ignore[attr-defined]
            if code in _RETRY_CODES:
                raise _Retryable(message) from None
            raise RemotePredictorError(f"remote predictor {self.target} failed: {message}") from None
        if not response.outputs or not response.raw_output_contents:
            raise RemotePredictorError(f"remote predictor {self.target} answered no raw output tensor")
        output = response.outputs[0]
        dtype = np.dtype(_NUMPY.get(output.datatype, np.float32)).newbyteorder("<")
        return np.frombuffer(response.raw_output_contents[0], dtype=dtype).reshape(list(output.shape)).copy()

    def is_ready(self) -> bool:
        response = self._stub.ModelReady(pb.ModelReadyRequest(name=self.model_name), timeout=min(self.timeout_s, 5))
        return bool(response.ready)

    def close(self) -> None:
        super().close()
        self._channel.close()


def connect(args: ServerArguments) -> RemotePredictor:
    """The remote predictor the arguments name (predictor_host, predictor_protocol and KServe's predictor_* flags)."""
    assert args.predictor_host, "connect() needs predictor_host"
    names = [n.strip() for n in args.tensor_input_names.split(",")] if args.tensor_input_names else None
    common = {
        "timeout_s": args.predictor_request_timeout_seconds,
        "use_ssl": args.predictor_use_ssl,
        "retries": args.predictor_request_retries,
    }
    if args.predictor_protocol == "grpc-v2":
        return GrpcV2Predictor(
            args.predictor_host,
            args.model_name,
            names,
            max_message_bytes=max(args.grpc_max_send_message_length, args.grpc_max_receive_message_length),
            **common,  # type: ignore[arg-type]
        )
    return RemoteV2Predictor(args.predictor_host, args.model_name, names, **common)  # type: ignore[arg-type]
