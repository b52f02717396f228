"""The Open Inference Protocol (KServe V2) through `tritonclient.http`, against a real `bentoml serve`.

The model is registered straight into the server's FINETUNE_SERVE_HOME (a tiny BERT trained for a
few seconds, exported to ONNX) rather than through a fine-tune job, so the module runs in seconds.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from artifact_helpers import LABELS
from service_helpers import serve_toy_model
from tritonclient.utils import InferenceServerException

from finetune_core import predict, registry
from service.routes.v2 import PLATFORMS

pytestmark = pytest.mark.process  # starts a real server

KEY = "v2-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = ["a great film", "the plot was awful", "quite a lovely movie really", "dull"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base):
    running = serve_toy_model(tmp_path_factory.mktemp("v2"), tiny_base, env={"FINETUNE_SERVE_API_KEY": KEY})
    yield running
    running.kill()


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def auth() -> dict:
    """A fresh headers dict per call: tritonclient's infer() adds Inference-Header-Content-Length to the one it is given."""
    return dict(AUTH)


def text_input(texts: list[str], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=np.object_), binary_data=binary)
    return tensor


def test_server_live_ready_and_metadata(client):
    assert client.is_server_live(headers=auth())
    assert client.is_server_ready(headers=auth())
    metadata = client.get_server_metadata(headers=auth())
    assert metadata["name"] == "finetune-serve" and "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_describes_inputs_and_outputs(client, server):
    metadata = client.get_model_metadata("toy", headers=auth())
    assert metadata["name"] == "toy" and metadata["versions"] == ["v1"]
    # The platform of the variant served by default: the fastest the export measured (ONNX or PyTorch here).
    with pytest.MonkeyPatch.context() as env:
        env.setenv(registry.ROOT_ENV, str(server.home))
        served = predict.default_variant(registry.resolve("toy"))
    assert metadata["platform"] == PLATFORMS[served]
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                                   {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]
    assert metadata["parameters"]["labels"] == LABELS
    assert client.get_model_metadata("toy", model_version="1", headers=auth())["parameters"]["version"] == "v1"


def test_model_ready(client):
    assert client.is_model_ready("toy", headers=auth())
    assert client.is_model_ready("toy", model_version="v1", headers=auth())
    assert not client.is_model_ready("no-such-model", headers=auth())


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_predict(client, http, binary):
    response = http.post("/predict", json={"model": "toy", "inputs": TEXTS})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("label", "probabilities")]
    result = client.infer("toy", [text_input(TEXTS, binary)], outputs=outputs, headers=auth())
    # Binary BYTES come back as bytes, JSON ones as str (as from Triton itself).
    labels = [label.decode() if binary else label for label in result.as_numpy("label")]
    probabilities = result.as_numpy("probabilities")
    assert labels == [p["label"] for p in predictions]
    assert probabilities.shape == (len(TEXTS), len(LABELS)) and probabilities.dtype == np.float32
    expected = [[p["scores"][label] for label in LABELS] for p in predictions]
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    assert result.get_response()["model_version"] == "v1"


def test_infer_defaults_and_versions(client):
    """tritonclient's defaults (binary input, no outputs named: all of them, binary) on a versioned route."""
    result = client.infer("toy", [text_input(TEXTS)], model_version="1", headers=auth())
    assert [label.decode() for label in result.as_numpy("label")] == ["positive", "negative", "positive", "negative"]
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(axis=1), 1.0, atol=1e-5)


def test_unknown_model_and_version_are_404(client):
    with pytest.raises(InferenceServerException) as err:
        client.infer("no-such-model", [text_input(["hello"])], headers=auth())
    assert err.value.status() == "404" and "no-such-model" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("toy", model_version="7", headers=auth())
    assert err.value.status() == "404" and "v7" in err.value.message()


def test_wrong_input_is_400_through_tritonclient(client):
    tensor = triton.InferInput("sentence", [1], "BYTES")
    tensor.set_data_from_numpy(np.array(["hello"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as err:
        client.infer("toy", [tensor], headers=auth())
    assert err.value.status() == "400" and "'text'" in err.value.message()


@pytest.mark.parametrize("body, says", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}).encode(), "BYTES"),
    (json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a"]}]}).encode(), "shape [3]"),
    (json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [0], "data": []}]}).encode(), "at least one"),
    (json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [5]}]}).encode(), "strings"),
    (json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
                 "outputs": [{"name": "logits"}]}).encode(), "no output 'logits'"),
], ids=["not-json", "datatype", "shape", "empty", "not-strings", "unknown-output"])
def test_malformed_request_is_400(http, body, says):
    response = http.post("/v2/models/toy/infer", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]


def test_truncated_binary_data_is_400(http):
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 6}}]}).encode()
    body = header + b"\x09\x00\x00\x00hi"  # says 9 bytes, 2 follow
    response = http.post("/v2/models/toy/infer", content=body, headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 400 and "only 2 remain" in response.json()["error"]


def test_api_key_is_required(server):
    response = httpx.post(server.url + "/v2/models/toy/infer", json={"inputs": []}, timeout=30)
    assert response.status_code == 401
    for path in ("/v2/health/live", "/v2/health/ready"):  # health stays open, like /livez and /readyz
        assert httpx.get(server.url + path, timeout=30).status_code == 200
    assert httpx.get(server.url + "/v2/models/toy", timeout=30).status_code == 401
