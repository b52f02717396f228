"""Locust load for the service: /predict with texts and with images, and V2 infer (KServe Open Inference Protocol).

Headless, bounded in time, users and requests (bench/load/run_locust.py starts a server and runs this):

    .venv/bin/locust -f bench/load/locustfile.py --headless --host http://127.0.0.1:3000 \
        -u 32 -r 32 --run-time 60s --max-requests 20000 --text-model NAME --image-model NAME
    .venv/bin/locust -f bench/load/locustfile.py --headless --host URL -u 32 -r 32 -t 60s --text-model NAME TextUser

Users send one input per request, back to back (so -u is the concurrency). TextUser (5 of 6 users)
sends a text to /predict or to V2 infer (3:2); ImageUser (1 of 6) an image to /predict and needs
--image-model; name the classes to run only some (`... TextUser`). Texts come from --texts (JSONL
with a text field), images from --images (PNG/JPEG files, base64 in the body). Any status but 200 is
a failure in Locust's table: a 429 (the service shedding load, service/shedding.py) shows as
`LocustBadStatusCode(code=429)`. --max-requests stops the run once that many requests have been
answered, whichever of it and --run-time comes first.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import gevent
from locust import FastHttpUser, events, task

REPO = Path(__file__).resolve().parents[2]


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--text-model", default="bench", help="the text model (V2 names it in the path)")
    parser.add_argument("--image-model", default="", help="an image model; without it no image requests are sent")
    parser.add_argument("--texts", default=str(REPO / "examples" / "sst2_sample" / "validation.jsonl"))
    parser.add_argument("--images", default=str(REPO / "tests" / "assets" / "mnist_png_small" / "validation"),
                        help="a folder searched for *.png and *.jpg")
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests in all")


TEXTS: list[str] = []
IMAGES: list[str] = []  # base64


@events.init.add_listener
def _load_inputs(environment, **_):
    options = environment.parsed_options
    if options is None:
        return
    path = Path(options.texts)
    TEXTS[:] = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    if ImageUser in environment.user_classes and not options.image_model:
        raise SystemExit("ImageUser needs --image-model NAME; without one, name the text users alone: ... TextUser")
    if options.image_model:
        files = sorted(p for p in Path(options.images).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise SystemExit(f"--images {options.images}: no PNG or JPEG files")
        IMAGES[:] = [base64.b64encode(p.read_bytes()).decode() for p in files[:256]]
    _cap_requests(environment, options.max_requests)


def _cap_requests(environment, cap: int) -> None:
    """Quit the run once `cap` requests have been answered (the bound beside --run-time)."""
    answered = 0

    def count(**_):
        nonlocal answered
        answered += 1
        if answered == cap:
            print(f"--max-requests {cap} reached: stopping", flush=True)
            gevent.spawn(environment.runner.quit)

    environment.events.request.add_listener(count)


class TextUser(FastHttpUser):
    """Back-to-back text requests, one text each: /predict (weight 3) and V2 infer (weight 2)."""

    weight = 5

    @task(3)
    def predict_text(self):
        model = self.environment.parsed_options.text_model
        self.client.post("/predict", json={"inputs": [random.choice(TEXTS)], "model": model}, name="/predict text")

    @task(2)
    def v2_infer_text(self):
        model = self.environment.parsed_options.text_model
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [random.choice(TEXTS)]}]}
        self.client.post(f"/v2/models/{model}/infer", json=body, name="/v2/models/{name}/infer text")


class ImageUser(FastHttpUser):
    """Back-to-back image requests to /predict, one base64 image each."""

    weight = 1

    @task
    def predict_image(self):
        model = self.environment.parsed_options.image_model
        self.client.post("/predict", json={"images": [random.choice(IMAGES)], "model": model}, name="/predict image")
