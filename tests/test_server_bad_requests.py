"""Bad requests to `mlx-sd serve`: each gets the right 4xx status and a JSON body that names the field (A1111: 422
`detail`; OpenAI: 400 `error` with `param`), never a 500 or a traceback, and the server keeps serving. Also the
authentication (Bearer key, basic auth) and the body and image size limits (413)."""

import base64
import io
import json

import openai
import pytest
import requests
import webuiapi
from PIL import Image

from helpers import running_server

KEY, USER, PASSWORD = "test-key", "user", "pass"
LIMIT = 256 * 1024  # bytes of request body
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(server_models, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("loras")
    (lora_dir / "style.safetensors").write_bytes(b"x")
    config = dict(models_dir=server_models, lora_dir=lora_dir, api_key=KEY, api_auth=f"{USER}:{PASSWORD}")
    with running_server(max_body_bytes=LIMIT, **config) as (url, server):
        yield url, server


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(image):
    return base64.b64encode(png(image)).decode()


SMALL = Image.new("RGB", (32, 32), (90, 120, 200))
HUGE = Image.new("L", (5000, 4000))  # 20 M pixels: a small PNG that decodes to too much
TEXT = base64.b64encode(b"hello, not an image").decode()

# (path, JSON body or raw bytes, status, text in the message)
A1111_CASES = [
    ("/sdapi/v1/txt2img", b"{bad json", 422, "body: malformed JSON"),
    ("/sdapi/v1/txt2img", b"[1, 2]", 422, "a JSON object is expected"),
    ("/sdapi/v1/txt2img", b"\xff\xfe", 422, "malformed JSON"),
    ("/sdapi/v1/txt2img", {"prompt": 5}, 422, "prompt must be a string"),
    ("/sdapi/v1/txt2img", {"prompt": "a\x00b"}, 422, "prompt contains the control character"),
    ("/sdapi/v1/txt2img", {"steps": "20"}, 422, "steps must be an integer"),
    ("/sdapi/v1/txt2img", {"steps": 0}, 422, "steps must be between 1"),
    ("/sdapi/v1/txt2img", {"cfg_scale": "7"}, 422, "guidance scale must be a number"),
    ("/sdapi/v1/txt2img", {"cfg_scale": 1e9}, 422, "guidance scale must be a finite number"),
    ("/sdapi/v1/txt2img", {"width": 100000}, 422, "width must be between 8 and"),
    ("/sdapi/v1/txt2img", {"height": 33}, 422, "height must be a multiple of 8"),
    ("/sdapi/v1/txt2img", {"width": 8192, "height": 8192}, 422, "pixels"),
    ("/sdapi/v1/txt2img", {"seed": 2**70}, 422, "seed must be between"),
    ("/sdapi/v1/txt2img", {"seed": 1.5}, 422, "seed must be an integer"),
    ("/sdapi/v1/txt2img", {"batch_size": 0}, 422, "batch_size must be between"),
    ("/sdapi/v1/txt2img", {"n_iter": "2"}, 422, "n_iter must be an integer"),
    ("/sdapi/v1/txt2img", {"sampler_name": "Nope"}, 422, "unknown sampler 'Nope'"),
    ("/sdapi/v1/txt2img", {"sampler_name": 3}, 422, "sampler_name must be of type str"),
    ("/sdapi/v1/txt2img", {"send_images": "yes"}, 422, "send_images must be of type bool"),
    ("/sdapi/v1/txt2img", {"enable_hr": True}, 422, "enable_hr: this server does not support it"),
    ("/sdapi/v1/txt2img", {"override_settings": "sd1"}, 422, "override_settings must be of type dict"),
    ("/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": "nope"}}, 422, "unknown model 'nope'"),
    ("/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": "../sd1"}}, 422, "unknown model '../sd1'"),
    ("/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": "/etc"}}, 422, "unknown model '/etc'"),
    ("/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": "a/b"}}, 422, "unknown model 'a/b'"),
    ("/sdapi/v1/txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 99}}, 422, "clip skip must be at most"),
    ("/sdapi/v1/txt2img", {"prompt": "<lora:missing:1>"}, 422, "no LoRA 'missing'"),
    ("/sdapi/v1/txt2img", {"prompt": "<lora:../style:1>"}, 422, "invalid LoRA name '../style'"),
    ("/sdapi/v1/txt2img", {"prompt": "(cat:" + "9" * 400 + ")"}, 422, "prompt"),
    ("/sdapi/v1/img2img", {"prompt": "x"}, 422, "init_images: give exactly one base64 image"),
    ("/sdapi/v1/img2img", {"init_images": "abc"}, 422, "init_images must be of type list"),
    ("/sdapi/v1/img2img", {"init_images": ["not base64!"]}, 422, "init_images is not valid base64"),
    ("/sdapi/v1/img2img", {"init_images": [TEXT]}, 422, "init_images is not a PNG, JPEG or WebP image"),
    ("/sdapi/v1/img2img", {"init_images": [b64(SMALL)], "denoising_strength": 2}, 422, "strength must be"),
    ("/sdapi/v1/img2img", {"init_images": [b64(SMALL)], "resize_mode": 1}, 422, "resize_mode"),
    ("/sdapi/v1/img2img", {"init_images": [b64(SMALL)], "mask": TEXT}, 422, "mask is not a PNG"),
    ("/sdapi/v1/img2img", {"init_images": [b64(SMALL)], "mask": b64(Image.new("L", (16, 16), 255))}, 422, "same size"),
    ("/sdapi/v1/img2img", {"init_images": [b64(SMALL)], "mask": b64(Image.new("L", (32, 32)))}, 422, "mask is empty"),
    ("/sdapi/v1/img2img", {"init_images": [b64(HUGE)]}, 413, "init_images is 5000x4000"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": "nope"}, 422, "sd_model_checkpoint: unknown model"),
    ("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 0}, 422, "clip skip must be between"),
    ("/sdapi/v1/txt2img", {"prompt": "x" * LIMIT}, 413, "larger than the server's limit"),
]

# (JSON body, status, param, text in the message)
OPENAI_CASES = [
    ({}, 400, "prompt", "prompt is required"),
    ({"prompt": 3}, 400, "prompt", "prompt must be a string"),
    ({"prompt": "x", "size": "big"}, 400, "size", "size must be WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "99999x64"}, 400, "size", "width must be between"),
    ({"prompt": "x", "size": "30x32"}, 400, "size", "width must be a multiple of 8"),
    ({"prompt": "x", "n": "2"}, 400, "n", "n must be of type int"),
    ({"prompt": "x", "n": 0}, 400, "n", "num_images must be between"),
    ({"prompt": "x", "response_format": "url"}, 400, "response_format", "only b64_json"),
    ({"prompt": "x", "output_format": "gif"}, 400, "output_format", "output_format must be one of"),
    ({"prompt": "x", "output_compression": 101}, 400, "output_compression", "between 0 and 100"),
    ({"prompt": "x", "model": "nope"}, 400, "model", "unknown model 'nope'"),
    ({"prompt": "x", "model": "stabilityai/sd-turbo"}, 400, "model", "unknown model"),
    ({"prompt": "x", "steps": 5000}, 400, "steps", "steps must be between"),
    ({"prompt": "x", "seed": "1"}, 400, "seed", "seed must be of type int"),
    ({"prompt": "x", "sampler": "nope"}, 400, "sampler", "unknown sampler"),
    ({"prompt": "x", "stream": True}, 400, "stream", "streaming is not supported"),
    ({"prompt": "x" * LIMIT}, 413, None, "larger than the server's limit"),
]


def post(url, path, body, headers=AUTH):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(url + path, data=data, headers={"Content-Type": "application/json", **headers}, timeout=60)


def still_serving(url):
    response = post(url, "/sdapi/v1/txt2img", {"prompt": "ok", "steps": 1, "width": 32, "height": 32})
    assert response.status_code == 200 and len(response.json()["images"]) == 1


@pytest.mark.parametrize("path, body, status, message", A1111_CASES)
def test_a1111_bad_request(served, path, body, status, message):
    url, _ = served
    response = post(url, path, body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and message in detail and "Traceback" not in detail, detail


@pytest.mark.parametrize("body, status, param, message", OPENAI_CASES)
def test_openai_bad_request(served, body, status, param, message):
    url, _ = served
    response = post(url, "/v1/images/generations", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error", error


def test_openai_bad_edits(served):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    rgb_mask = ("mask.png", png(Image.new("RGB", (32, 32))), "image/png")
    cases = [
        (dict(image=("a.txt", b"plain text", "text/plain")), "image", "image is not a PNG"),
        (dict(image=("a.png", png(SMALL), "image/png"), mask=rgb_mask), "mask", "alpha channel"),
        (dict(image=("a.png", png(SMALL), "image/png"), mask=("m.png", png(Image.new("RGBA", (8, 8))))), "mask", "8x8"),
        (dict(image=("a.png", png(HUGE), "image/png")), "image", "image is 5000x4000"),
    ]
    for files, param, message in cases:
        with pytest.raises(openai.APIStatusError) as caught:
            client.images.edit(prompt="x", **files)
        assert caught.value.status_code in (400, 413) and caught.value.body["param"] == param
        assert message in caught.value.body["message"], caught.value.body
    response = requests.post(f"{url}/v1/images/edits", data={"prompt": "x"}, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"
    still_serving(url)


def test_nulls_mean_defaults(served):
    url, _ = served
    nulls = dict.fromkeys(["prompt", "negative_prompt", "seed", "batch_size", "n_iter", "width", "sampler_name"])
    a1111 = post(url, "/sdapi/v1/txt2img", {**nulls, "steps": 1})
    assert a1111.status_code == 200 and json.loads(a1111.json()["info"])["width"] == 64  # the model's default
    nulls = dict.fromkeys(["size", "n", "response_format", "output_format", "model", "seed"])
    openai_response = post(url, "/v1/images/generations", {"prompt": "x", **nulls, "steps": 1})
    assert openai_response.status_code == 200 and openai_response.json()["size"] == "64x64"


def test_unknown_routes_and_methods_are_json(served):
    url, _ = served
    missing = requests.get(f"{url}/sdapi/v1/nothing", headers=AUTH)
    wrong_method = requests.get(f"{url}/sdapi/v1/txt2img", headers=AUTH)
    openai_missing = requests.get(f"{url}/v1/nothing", headers=AUTH)
    assert (missing.status_code, missing.json()) == (404, {"detail": "Not Found"})
    assert (wrong_method.status_code, wrong_method.json()) == (405, {"detail": "Method Not Allowed"})
    assert openai_missing.status_code == 404 and openai_missing.json()["error"]["message"] == "Not Found"


def test_chunked_body_over_the_limit_is_413(served):
    url, _ = served
    chunks = (b'{"prompt": "' + b"x" * 65536 if i == 0 else b"x" * 65536 for i in range(8))
    response = requests.post(f"{url}/sdapi/v1/txt2img", data=chunks, headers=AUTH)
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    still_serving(url)


def test_authentication(served):
    url, _ = served
    port = int(url.rsplit(":", 1)[1])
    anonymous = requests.get(f"{url}/sdapi/v1/options")
    assert anonymous.status_code == 401 and anonymous.json() == {"detail": "Incorrect username or password"}
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(f"{url}/sdapi/v1/options", auth=(USER, "wrong")).status_code == 401
    assert requests.get(f"{url}/sdapi/v1/options", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.get(f"{url}/", auth=("anyone", KEY)).status_code == 200  # browsers: the key as password
    unauthorized = requests.post(f"{url}/v1/images/generations", json={"prompt": "x"})
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in openai.OpenAI(base_url=f"{url}/v1", api_key=KEY).models.list()] == ["sd1", "turbo"]
    a1111 = webuiapi.WebUIApi(host="127.0.0.1", port=port, username=USER, password=PASSWORD)
    assert a1111.get_options()["sd_model_checkpoint"] == "sd1"
    result = a1111.txt2img(prompt="x", steps=1, width=32, height=32)
    assert result.info["sd_model_name"] == "sd1"


def test_requests_that_only_a_misled_browser_sends_are_refused(served):
    url, _ = served
    host = url.removeprefix("http://")
    body = {"prompt": "x", "steps": 1, "width": 32, "height": 32}
    other_site = requests.post(f"{url}/sdapi/v1/txt2img", json=body, headers={**AUTH, "Origin": "http://evil.test"})
    rebound = requests.post(f"{url}/v1/images/generations", json=body, headers={**AUTH, "Host": "evil.test:7860"})
    bad_host = requests.get(f"{url}/sdapi/v1/options", headers={**AUTH, "Host": "[::1"})
    assert other_site.status_code == 403 and "other sites" in other_site.json()["detail"]
    assert rebound.status_code == 403 and "loopback" in rebound.json()["error"]["message"]
    assert bad_host.status_code == 403
    own_page = requests.post(f"{url}/sdapi/v1/txt2img", json=body, headers={**AUTH, "Origin": url, "Host": host})
    assert own_page.status_code == 200


def test_the_server_still_serves_after_all_of_that(served):
    url, server = served
    still_serving(url)
    assert server.worker._thread.is_alive() and server.worker.queued() == 0


def test_schedulers_and_a_bad_scheduler(served):
    """A1111 1.9+ lists schedule types at /sdapi/v1/schedulers; one a sampler cannot take is a 422."""
    url, _ = served
    labels = [row["label"] for row in requests.get(f"{url}/sdapi/v1/schedulers", headers=AUTH, timeout=60).json()]
    assert labels == ["Automatic", "Karras", "Exponential", "Beta", "SGM Uniform"]
    body = {"prompt": "x", "steps": 1, "width": 32, "height": 32, "sampler_name": "DDIM", "scheduler": "Karras"}
    response = post(url, "/sdapi/v1/txt2img", body)
    assert response.status_code == 422 and "cannot use the Karras schedule" in response.json()["detail"]
    still_serving(url)
