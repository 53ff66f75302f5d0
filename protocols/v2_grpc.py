"""Open Inference Protocol (KServe V2) over gRPC: KServe's GRPCInferenceService, as `tritonclient.grpc` calls it.

The protobuf and grpc modules are the generated ones inside `tritonclient` (package `inference`): Triton's
GRPCInferenceService is KServe's plus Triton extras, with the same full service name, so KServe's and
Triton's clients both work. The extras this server has no use for (model config, repository, statistics,
trace, logging, shared memory) answer UNIMPLEMENTED; ModelStreamInfer answers each request of the stream.

Requests reuse the REST V2 translation (protocols/v2.py): one BYTES input of texts, from
`contents.bytes_contents` or `raw_input_contents` (4-byte little-endian length-prefixed elements);
`parameters` (request and input) are the REST request options. Outputs go in `raw_output_contents`
(what tritonclient.grpc reads), little-endian numbers and length-prefixed BYTES, one per output.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from handlers.errors import InvalidInput, ModelNotFound, ServingError
from handlers.requests import TaskResult, TensorSpec
from protocols import v2, v2_binary
from protocols.grpc_guard import ApiKeyInterceptor, LifecycleInterceptor, LifecycleState
from settings.tasks import Task

if TYPE_CHECKING:  # the runtime module imports torch; this one need not
    from engines.encoder_runtime import PredictiveRuntime

logger = logging.getLogger(__name__)

DEFAULT_SERVER_NAME = "hf-bentoml-server"
# KServe allows 8 MiB messages by default; texts in and embeddings out may be larger.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Request parameters of the gRPC protocol itself (scheduling hints tritonclient may send): not request options.
_HINT_PARAMETERS = {"priority", "timeout"}
# tritonclient's reserved prefix (e.g. triton_enable_empty_final_response on streams): not request options.
_TRITON_PREFIX = "triton_"
# The methods this server answers; every other method of the service is a Triton extra → UNIMPLEMENTED.
IMPLEMENTED = frozenset(
    {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelStreamInfer"}
)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:+=/-]{1,128}")

_STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    404: grpc.StatusCode.NOT_FOUND,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def grpc_status(status_code: int) -> grpc.StatusCode:
    """The gRPC status of a ServingError's HTTP status; INTERNAL for anything not listed."""
    return _STATUS_CODES.get(status_code, grpc.StatusCode.INTERNAL)


class StageTimer(Protocol):
    """What service.py's _Timer offers: KServe's per-stage latency histograms."""

    def observe(self, stage: str, started: float) -> None: ...

    async def run(self, stage: str, work: Callable[[], Awaitable[TaskResult]]) -> TaskResult: ...


# --- requests ---


def parameter_value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def parameters_dict(parameters: Any) -> dict[str, Any]:
    """A protobuf map<string, InferParameter> as plain values, protocol hints and triton_* names left out."""
    values = {}
    for name, parameter in parameters.items():
        if name in _HINT_PARAMETERS or name.startswith(_TRITON_PREFIX):
            continue
        if name.startswith("shared_memory"):
            raise InvalidInput("shared memory tensors are not supported; send the data in the request")
        values[name] = parameter_value(parameter)
    return values


def parse_infer_request(request: pb.ModelInferRequest) -> v2.ParsedInfer:
    v2.require_one_input([tensor.name for tensor in request.inputs])
    tensor = request.inputs[0]
    shape = list(tensor.shape)
    v2.check_text_tensor(tensor.name, tensor.datatype, shape)
    others = [field.name for field, _ in tensor.contents.ListFields() if field.name != "bytes_contents"]
    if others:
        raise InvalidInput(f"input '{tensor.name}' is BYTES but carries {', '.join(others)}")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInput(
                f"raw_input_contents has {len(request.raw_input_contents)} entries for {len(request.inputs)} input(s)"
            )
        if tensor.contents.bytes_contents:
            raise InvalidInput(f"input '{tensor.name}' has both contents and raw_input_contents")
        flat: list[Any] = v2_binary.decode_tensor("BYTES", request.raw_input_contents[0])
    else:
        flat = list(tensor.contents.bytes_contents)
    texts = v2.texts_from_elements(tensor.name, shape, flat)
    options = v2.request_options(parameters_dict(request.parameters), parameters_dict(tensor.parameters))
    requested = [v2.RequestOutput(name=output.name) for output in request.outputs] or None
    # gRPC outputs are always raw bytes (raw_output_contents): binary_output is moot here.
    return v2.ParsedInfer(request.id or None, texts, options, requested, binary_output=True, input_shape=shape)


# --- responses ---


def infer_response(
    model_name: str, parsed: v2.ParsedInfer, result: TaskResult, specs: list[TensorSpec]
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, id=parsed.request_id or "")
    for spec, shape, flat in v2.output_tensors(
        result, v2.select_outputs(specs, parsed.requested_outputs, parsed.options.extra_outputs)
    ):
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        response.raw_output_contents.append(v2_binary.encode_tensor(spec.datatype, flat))
    return response


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


# --- the service ---


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over one PredictiveRuntime."""

    def __init__(
        self,
        runtime: PredictiveRuntime,
        *,
        server_name: str = DEFAULT_SERVER_NAME,
        server_version: str | None = None,
        timer: StageTimer | None = None,
        retry_after_s: int = 1,
    ) -> None:
        self.runtime = runtime
        self.server_name = server_name
        self.server_version = server_version or _package_version(server_name)
        self.timer = timer
        self.retry_after_s = retry_after_s

    @property
    def model_name(self) -> str:
        return self.runtime.args.model_name

    def _check_name(self, name: str) -> None:
        if name != self.model_name:
            raise ModelNotFound(name)

    async def _answer(self, context: grpc.aio.ServicerContext, method: str, work: Callable[[], Awaitable[Any]]) -> Any:
        """Run `work`; an error ends the call with its status, a message naming the request id, and trailing
        metadata `x-request-id` (plus `retry-after` seconds on RESOURCE_EXHAUSTED and UNAVAILABLE)."""
        try:
            return await work()
        except ServingError as error:
            request_id = request_id_of(context)
            if error.status_code >= 500:
                logger.warning("gRPC %s -> %d [%s]: %s", method, error.status_code, request_id, error.message[:500])
            trailing = [("x-request-id", request_id)]
            if error.status_code in (429, 503):
                trailing.append(("retry-after", str(self.retry_after_s)))
            await context.abort(
                grpc_status(error.status_code), f"{error.message} (request id {request_id})", tuple(trailing)
            )
        except Exception:  # a bug; the client still gets a status instead of a bare failure
            request_id = request_id_of(context)
            logger.exception("gRPC %s [%s] failed", method, request_id)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal server error; the server log has the details under request id {request_id}",
                (("x-request-id", request_id),),
            )

    # --- health and metadata ---

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.runtime.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> pb.ModelReadyResponse:
            self._check_name(request.name)
            return pb.ModelReadyResponse(ready=self.runtime.ready)

        return await self._answer(context, "ModelReady", work)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        # No extensions: binary_tensor_data is REST's, and the repository methods are not served here.
        return pb.ServerMetadataResponse(name=self.server_name, version=self.server_version, extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> pb.ModelMetadataResponse:
            self._check_name(request.name)
            handler = self.runtime.handler
            return pb.ModelMetadataResponse(
                name=request.name,
                versions=[],
                platform="huggingface",
                inputs=[_tensor_metadata(spec) for spec in handler.input_specs()],
                outputs=[_tensor_metadata(spec) for spec in handler.output_specs(self.runtime.options_for(None))],
            )

        return await self._answer(context, "ModelMetadata", work)

    # --- inference ---

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        self._check_name(request.model_name)
        started = time.perf_counter()
        parsed = parse_infer_request(request)
        options = self.runtime.options_for(parsed.options)
        specs = self.runtime.handler.output_specs(options)
        v2.select_outputs(specs, parsed.requested_outputs)  # unknown output names fail before the model runs
        inputs: list[Any] = parsed.text_pairs() if self.runtime.source.task == Task.rerank else parsed.texts
        if self.timer is not None:
            self.timer.observe("preprocess", started)
            result = await self.timer.run("predict", lambda: self.runtime.predict(inputs, options))
        else:
            result = await self.runtime.predict(inputs, options)
        started = time.perf_counter()
        response = infer_response(self.model_name, parsed, result, specs)
        if self.timer is not None:
            self.timer.observe("postprocess", started)
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._answer(context, "ModelInfer", lambda: self._infer(request))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request of the stream answered as it completes (concurrent requests batch together);
        a failed request gets an error_message response and the stream goes on, as in Triton."""
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                response = pb.ModelStreamInferResponse(infer_response=await self._infer(request))
            except ServingError as error:
                response = _stream_error(request, error.message)
            except Exception:
                request_id = request_id_of(context)
                logger.exception("gRPC ModelStreamInfer request [%s] failed", request_id)
                response = _stream_error(request, f"internal server error; see the server log, request id {request_id}")
            responses.put_nowait(response)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(answer(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending:
                    await asyncio.gather(*pending)
            finally:
                responses.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader  # a failed read ends the call with its error
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The client's `x-request-id` metadata when it is short and plain, else a new id."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    answered = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    return pb.ModelStreamInferResponse(error_message=message, infer_response=answered)


def _unimplemented(method: str) -> Callable[..., Awaitable[Any]]:
    async def refuse(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server")

    refuse.__name__ = method
    return refuse


for _method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    if _method.name not in IMPLEMENTED:
        setattr(InferenceServicer, _method.name, _unimplemented(_method.name))


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "0.1.0"


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start_grpc_server(
    runtime: PredictiveRuntime,
    port: int,
    host: str = "0.0.0.0",
    *,
    server_name: str = DEFAULT_SERVER_NAME,
    server_version: str | None = None,
    timer: StageTimer | None = None,
    max_send_message_length: int = MAX_MESSAGE_BYTES,
    max_receive_message_length: int = MAX_MESSAGE_BYTES,
    api_key: str | None = None,
    retry_after_s: int = 1,
    lifecycle: LifecycleState | None = None,
    on_cancelled: Callable[[str], None] | None = None,
) -> grpc.aio.Server:
    """Serve GRPCInferenceService on host:port in the running event loop; stop it with `await server.stop(grace)`.

    `lifecycle` (routes.lifecycle.Lifecycle) refuses new calls while draining and counts calls in flight;
    `on_cancelled(method)` hears of each call its client cancelled (protocols/grpc_guard.py).

    grpc sets SO_REUSEPORT by default, so every BentoML worker process may bind the same port.
    """
    server = grpc.aio.server(
        interceptors=[
            LifecycleInterceptor(lifecycle, retry_after_s=retry_after_s, on_cancelled=on_cancelled),
            *([ApiKeyInterceptor(api_key)] if api_key else []),
        ],
        options=[
            ("grpc.max_send_message_length", max_send_message_length),
            # A larger message is refused by grpc itself with RESOURCE_EXHAUSTED before it is read into memory.
            ("grpc.max_receive_message_length", max_receive_message_length),
            ("grpc.so_reuseport", 1),
        ],
    )
    servicer = InferenceServicer(
        runtime, server_name=server_name, server_version=server_version, timer=timer, retry_after_s=retry_after_s
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(_address(host, port))
    if bound == 0:  # older grpc versions report a failed bind this way instead of raising
        raise RuntimeError(f"gRPC server could not bind {_address(host, port)}")
    await server.start()
    logger.info("gRPC inference service for model '%s' on %s", runtime.args.model_name, _address(host, bound))
    return server
