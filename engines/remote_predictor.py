"""A model that runs elsewhere: tokenizer tensors go to a remote Open Inference Protocol (V2) predictor.

As KServe's `predictor_host`: this server tokenizes and post-processes; a V2 server such as Triton
runs the forward pass and answers with the model's first output (logits, or hidden states for
embeddings). Called from the batcher thread, so a blocking HTTP client is the right tool.
"""

from __future__ import annotations

import httpx
import numpy as np
import torch

from handlers.errors import ServingError

_DATATYPES = {np.dtype("int64"): "INT64", np.dtype("int32"): "INT32"}
_NUMPY = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


class RemotePredictorError(ServingError):
    status_code = 502
    error_type = "bad_gateway"


class RemoteV2Predictor:
    def __init__(self, host: str, model_name: str, input_names: list[str] | None, timeout_s: float = 60) -> None:
        base = host if host.startswith(("http://", "https://")) else f"http://{host}"
        self.url = f"{base.rstrip('/')}/v2/models/{model_name}/infer"
        self.input_names = input_names
        self._client = httpx.Client(timeout=timeout_s)

    def infer(self, model_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        tensors = []
        for name, tensor in model_inputs.items():
            if self.input_names and name not in self.input_names:
                continue
            array = tensor.cpu().numpy()
            tensors.append(
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": _DATATYPES[array.dtype],
                    "data": array.flatten().tolist(),
                }
            )
        try:
            response = self._client.post(self.url, json={"inputs": tensors})
        except httpx.HTTPError as error:
            raise RemotePredictorError(f"remote predictor {self.url} failed: {error}") from None
        if response.status_code != 200:
            raise RemotePredictorError(
                f"remote predictor {self.url} answered {response.status_code}: {response.text[:500]}"
            )
        output = response.json()["outputs"][0]
        array = np.asarray(output["data"], dtype=_NUMPY.get(output["datatype"], np.float32)).reshape(output["shape"])
        return torch.from_numpy(array)

    def close(self) -> None:
        self._client.close()
