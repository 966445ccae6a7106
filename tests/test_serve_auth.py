"""API keys on the real server (uvicorn on 127.0.0.1, httpx and the openai client): every route the app has,
read from the app itself, answers 401 without the key or with a wrong one, except /health; adapter routes need
the admin key."""

import os
import re
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from lorakit.serve.app import create_app
from lorakit.serve.auth import is_admin_route
from lorakit.serve.engine import Engine, ServeConfig
from lorakit.studio import add_train_routes

KEY, ADMIN = "user-key-1", "admin-key-2"


@pytest.fixture(scope="module")
def keyed_server(serve_model_dir, adapters):
    root = os.path.dirname(adapters[0])
    engine = Engine(ServeConfig(model=serve_model_dir, adapters={"yes": adapters[0]}, adapter_root=root,
                                dtype="fp32", runs_dir=root, api_key=KEY, admin_api_key=ADMIN,
                                allow_training=True))
    app = create_app(engine, [add_train_routes])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    while not server.started:
        time.sleep(0.05)
    yield app, base
    server.should_exit = True
    thread.join(10)


def _routes(app):
    """(method, concrete path) for every route of the app, path parameters filled in."""
    out = []
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD":
                out.append((method, re.sub(r"\{[^}]+\}", "yes", route.path)))
    return out


def _call(base, method, path, key=None, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, base + path, headers=headers, timeout=30, **kw)


def test_no_key_or_a_wrong_key_is_401_on_every_route_but_health(keyed_server):
    app, base = keyed_server
    routes = _routes(app)
    assert len(routes) >= 14 and ("GET", "/metrics") in routes and ("POST", "/v1/load_lora_adapter") in routes
    for method, path in routes:
        for key in (None, "wrong", KEY[:-1]):
            r = _call(base, method, path, key, json={})
            if path == "/health":
                assert r.status_code == 200, (method, path)
                continue
            assert r.status_code == 401, (method, path, key, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "authentication_error"
        if path != "/health":
            r = _call(base, method, path, KEY, json={})
            assert (r.status_code == 401) == is_admin_route(method, path), (method, path, r.status_code)
            assert _call(base, method, path, ADMIN, json={}).status_code != 401, (method, path)


def test_the_user_key_serves_completions_and_only_the_admin_key_loads_adapters(keyed_server):
    _, base = keyed_server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
    answer = client.chat.completions.create(model="yes", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert answer.choices[0].message.content.strip().startswith("yes")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    body = {"lora_name": "no", "lora_path": "no"}
    assert _call(base, "POST", "/v1/load_lora_adapter", KEY, json=body).status_code == 401
    loaded = _call(base, "POST", "/v1/load_lora_adapter", ADMIN, json=body)
    assert loaded.status_code == 200 and "Success" in loaded.text
    assert "no" in {m.id for m in client.models.list()}
    assert _call(base, "POST", "/v1/unload_lora_adapter", KEY, json={"lora_name": "no"}).status_code == 401
    assert _call(base, "POST", "/v1/unload_lora_adapter", ADMIN, json={"lora_name": "no"}).status_code == 200
    assert "no" not in {m.id for m in client.models.list()}
    metrics = _prometheus(_call(base, "GET", "/metrics", KEY).text)
    assert metrics["lorakit:request_total"] >= 1 and metrics["lorakit:generation_tokens_total"] >= 4
    assert metrics["lorakit:lora_adapter_loads_total"] >= 2  # yes at start, no through the endpoint
    assert metrics["lorakit:time_to_first_token_seconds_count"] >= 1
    assert metrics['lorakit:time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        metrics["lorakit:time_to_first_token_seconds_count"]
    assert metrics["lorakit:num_requests_running"] == 0 and 0 < metrics["lorakit:kv_cache_usage_perc"] < 1


def _prometheus(text: str) -> dict[str, float]:
    """Prometheus text format: every sample line `name{labels} value`, comments skipped."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_the_playground_asks_for_the_key_once_and_keeps_it_in_a_cookie(keyed_server):
    _, base = keyed_server
    page = httpx.get(base + "/", headers={"Accept": "text/html"})
    assert page.status_code == 401 and "<input id='api_key'" in page.text
    assert httpx.get(base + "/?api_key=wrong", headers={"Accept": "text/html"}).status_code == 401
    with httpx.Client(base_url=base) as browser:
        login = browser.get("/?api_key=" + KEY)
        assert login.status_code == 303 and "HttpOnly" in login.headers["set-cookie"]
        assert browser.get("/").status_code == 200  # the cookie now opens the page ...
        assert browser.get("/v1/models").status_code == 200  # ... and its own requests
