"""Bad input gets the right 4xx, a JSON `detail` a person can read, and creates nothing.

One table of cases drives one check (peft-style): each case sends a request and names the
status and the field path (or a fragment of the detail) it expects.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from service.models import Dataset, Job
from tests.service.conftest import ALPACA_ROWS, auth, job_body, jsonl, make_dataset, upload


def _post_job(**overrides):
    return lambda c, k, ctx: c.post("/jobs", headers=auth(k), json=job_body(ctx["dataset"], **overrides))


def _post_hp(**hp):
    return lambda c, k, ctx: c.post("/jobs", headers=auth(k), json=job_body(ctx["dataset"], hyperparameters=hp))


def _post_raw(template: str):
    """A body JSON cannot express but Python's parser reads (NaN, 1e999 = infinity)."""
    return lambda c, k, ctx: c.post(
        "/jobs", headers={**auth(k), "Content-Type": "application/json"}, content=template.replace("DS", ctx["dataset"]).encode()
    )


JOB_CASES = [
    # name, request, status, expected field (or detail fragment)
    ("allocation too short", _post_job(allocation=[2, 2, 2]), 422, "body.allocation"),
    ("allocation too long", _post_job(allocation=[2, 2, 2, 2, 2]), 422, "body.allocation"),
    ("negative experts", _post_job(allocation=[2, -1, 2, 2]), 422, "body.allocation"),
    ("zero experts", _post_job(allocation="2048"), 422, "body.allocation"),
    ("more groups than layers", _post_job(allocation="23456"), 422, "body.allocation"),
    ("experts over the limit", _post_job(allocation=[2, 2, 2, 999]), 422, "body.allocation"),
    ("unknown preset", _post_job(allocation={"preset": "diamond", "average": 4}), 422, "body.allocation"),
    ("preset with extra keys", _post_job(allocation={"preset": "rectangle", "average": 4, "x": 1}), 422, "body.allocation"),
    ("allocation of floats", _post_job(allocation=[2.5, 2, 2, 2]), 422, "body.allocation"),
    ("allocation a number", _post_job(allocation=3.5), 422, "body.allocation"),
    ("allocation garbage string", _post_job(allocation="two,four"), 422, "body.allocation"),
    ("allocation with a trailing comma", _post_job(allocation="2, 4, 6, 8,"), 422, "entry 4 is empty"),
    ("preset average NaN", _post_raw('{"base_model": "tiny-llama", "dataset_id": "DS", "allocation": {"preset": "rectangle", "average": NaN}}'), 422, "body.allocation"),
    ("top_k per layer of wrong length", _post_job(top_k=[1, 2]), 422, "body.top_k"),
    ("top_k zero", _post_job(top_k=0), 422, "body.top_k"),
    ("unknown model", _post_job(base_model="gpt-17"), 422, "body.base_model"),
    ("unknown dataset", lambda c, k, ctx: c.post("/jobs", headers=auth(k), json=job_body("ds_doesnotexist")), 422, "body.dataset_id"),
    ("another tenant's dataset", lambda c, k, ctx: c.post("/jobs", headers=auth(k), json=job_body(ctx["other_dataset"])), 422, "body.dataset_id"),
    ("unknown validation dataset", _post_job(validation_dataset_id="ds_nope"), 422, "body.validation_dataset_id"),
    ("unknown method", _post_job(method="dora"), 422, "body.method"),
    ("allocation with lora", _post_job(method="lora", allocation="2468"), 422, "body.allocation"),
    ("unknown field", _post_job(colour="blue"), 422, "body.colour"),
    ("missing dataset_id", lambda c, k, ctx: c.post("/jobs", headers=auth(k), json={"base_model": "tiny-llama"}), 422, "body.dataset_id"),
    ("negative learning rate", _post_hp(learning_rate=-0.1), 422, "body.hyperparameters.learning_rate"),
    ("zero batch size", _post_hp(batch_size=0), 422, "body.hyperparameters.batch_size"),
    ("dropout of 1", _post_hp(dropout=1.0), 422, "body.hyperparameters.dropout"),
    ("unknown hyperparameter", _post_hp(learning_rat=0.1), 422, "body.hyperparameters.learning_rat"),
    ("a number in quotes", _post_hp(epochs="3"), 422, "body.hyperparameters.epochs"),
    ("a boolean as a number", _post_hp(learning_rate=True), 422, "body.hyperparameters.learning_rate"),
    ("a string as a boolean", _post_hp(train_on_inputs="yes"), 422, "body.hyperparameters.train_on_inputs"),
    ("unknown target module", _post_hp(target_modules=["q_proj", "c_attn"]), 422, "body.hyperparameters.target_modules"),
    ("target module in the wrong block", _post_hp(target_modules=["mlp.q_proj"]), 422, "body.hyperparameters.target_modules"),
    ("cutoff_len past the model's positions", _post_hp(cutoff_len=1024), 422, "body.hyperparameters.cutoff_len"),
    ("eval_every without a validation set", _post_hp(eval_every=2), 422, "body.hyperparameters.eval_every"),
    ("eval_generate_rows without a validation set", _post_hp(eval_generate_rows=8), 422, "body.hyperparameters.eval_generate_rows"),
    ("eval_generate_rows of 0", _post_hp(eval_generate_rows=0), 422, "body.hyperparameters.eval_generate_rows"),
    ("a seed of 1e30", _post_hp(seed=1e30), 422, "body.hyperparameters.seed"),
    ("a fractional step count", _post_hp(max_steps=2.5), 422, "body.hyperparameters.max_steps"),
    ("checkpoint_every of 1e30", _post_hp(checkpoint_every=1e30), 422, "body.hyperparameters.checkpoint_every"),
    ("warmup longer than max_steps", _post_hp(max_steps=4, warmup_steps=5), 422, "body.hyperparameters.warmup_steps"),
    ("a suffix too long", _post_job(suffix="x" * 65), 422, "body.suffix"),
    ("an empty validation dataset id", _post_job(validation_dataset_id=""), 422, "body.validation_dataset_id"),
    ("infinite max_grad_norm", _post_raw('{"base_model": "tiny-llama", "dataset_id": "DS", "hyperparameters": {"max_grad_norm": 1e999}}'), 422, "body.hyperparameters.max_grad_norm"),
    # PostgreSQL refuses NUL in text and JSONB: these were 500s there.
    ("NUL in suffix", _post_job(suffix="a\x00b"), 422, "body.suffix"),
    ("NUL in base_model", _post_job(base_model="tiny-llama\x00"), 422, "body.base_model"),
    ("NUL in dataset_id", lambda c, k, ctx: c.post("/jobs", headers=auth(k), json=job_body(ctx["dataset"] + "\x00")), 422, "body.dataset_id"),
    ("NUL in a target module", _post_hp(target_modules=["q_proj\x00"]), 422, "body.hyperparameters.target_modules"),
    ("malformed JSON body", lambda c, k, ctx: c.post("/jobs", headers={**auth(k), "Content-Type": "application/json"}, content=b"{not json"), 422, "body"),
    ("missing key", lambda c, k, ctx: c.post("/jobs", json=job_body(ctx["dataset"])), 401, "missing API key"),
    ("invalid key", lambda c, k, ctx: c.post("/jobs", headers=auth("mola_000000000000_" + "x" * 43), json=job_body(ctx["dataset"])), 401, "invalid API key"),
    ("malformed key", lambda c, k, ctx: c.post("/jobs", headers=auth("hunter2"), json=job_body(ctx["dataset"])), 401, "invalid API key"),
    ("basic auth instead of bearer", lambda c, k, ctx: c.post("/jobs", headers={"Authorization": "Basic dXNlcjpwYXNz"}, json=job_body(ctx["dataset"])), 401, "API key"),
]


@pytest.fixture
def ctx(client, key, other_key):
    return {"dataset": make_dataset(client, key), "other_dataset": make_dataset(client, other_key)}


def _counts(sessions):
    with sessions() as session:
        return (
            session.scalar(select(func.count()).select_from(Job)),
            session.scalar(select(func.count()).select_from(Dataset)),
        )


def _check(response, status: int, expected: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"], body
    assert "Traceback" not in response.text
    if status == 422 and expected.startswith("body"):
        assert any(e["field"] == expected or e["field"].startswith(expected + ".") for e in body["errors"]), body
    else:
        assert expected in body["detail"], body
    return body


@pytest.mark.parametrize("name,request_fn,status,expected", JOB_CASES, ids=[c[0] for c in JOB_CASES])
def test_bad_job_request(client, key, ctx, sessions, queue, storage, name, request_fn, status, expected):
    before = _counts(sessions)
    _check(request_fn(client, key, ctx), status, expected)
    assert _counts(sessions) == before
    assert queue.enqueued == []


def test_messages_name_the_model_and_its_layers(client, key, ctx):
    body = client.post("/jobs", headers=auth(key), json=job_body(ctx["dataset"], allocation=[2, 2, 2])).json()
    assert body["detail"] == "body.allocation: allocation has 3 entries but tiny-llama has 4 layers"
    body = client.post("/jobs", headers=auth(key), json=job_body(ctx["dataset"], allocation=[2, 0, 2, 2])).json()
    assert body["detail"] == "body.allocation: allocation: layer 1 has 0, expected at least 1 (tiny-llama has 4 layers)"
    body = client.post("/jobs", headers={**auth(key), "Content-Type": "application/json"}, content=b'{"base_model": ').json()
    assert body["detail"].startswith("body: the request body is not valid JSON")


MESSAGES = [
    # request, the exact detail
    (_post_hp(seed=1e30), "body.hyperparameters.seed: must be a whole number within [0, 4294967295]"),
    (_post_hp(seed=-1), "body.hyperparameters.seed: must be a whole number within [0, 4294967295]"),
    (_post_hp(max_steps=2.5), "body.hyperparameters.max_steps: must be a whole number within [1, 10000000]"),
    (_post_job(suffix="x" * 65), "body.suffix: String should have at most 64 characters"),
    (_post_hp(max_steps=4, warmup_steps=5), "body.hyperparameters.warmup_steps: 5 is more than max_steps (4): the warmup must fit in the run"),
    (
        _post_raw('{"base_model": "tiny-llama", "dataset_id": "DS", "allocation": {"preset": "triangle", "average": 1e400}}'),
        "body.allocation: an allocation preset's average must be a finite number, got inf",
    ),
]


@pytest.mark.parametrize("request_fn,detail", MESSAGES, ids=[m[1].split(":")[0] + f" {i}" for i, m in enumerate(MESSAGES)])
def test_messages_say_what_is_wanted(client, key, ctx, request_fn, detail):
    assert request_fn(client, key, ctx).json()["detail"] == detail


def test_null_hyperparameters_mean_every_default(client, key, ctx):
    response = client.post("/jobs", headers=auth(key), json={**job_body(ctx["dataset"]), "hyperparameters": None})
    assert response.status_code == 201, response.text
    assert response.json()["hyperparameters"]["learning_rate"] == 3e-4


def test_a_warmup_as_long_as_max_steps_is_fine(client, key, ctx):
    assert _post_hp(max_steps=4, warmup_steps=4, seed=42.0)(client, key, ctx).status_code == 201


def test_every_401_has_the_same_body(client):
    refused_unread = client.post("/jobs", json={})  # by the middleware, before the body is read
    refused_by_the_key_check = client.get("/jobs")
    assert refused_unread.status_code == refused_by_the_key_check.status_code == 401
    assert refused_unread.content == refused_by_the_key_check.content
    assert refused_unread.headers["content-type"] == refused_by_the_key_check.headers["content-type"]


UPLOAD_CASES = [
    ("malformed JSONL", b'{"instruction": "a", "output": "b"}\n{not json\n{"foo": 1}\n', 422, "line 2"),
    ("empty file", b"", 422, "no training rows"),
    ("only blank lines", b"\n\n\n", 422, "no training rows"),
    ("binary garbage", bytes(range(256)) * 4, 422, "body.file"),
    ("wrong field types", b'{"instruction": 3, "output": ["x"]}\n', 422, "line 1"),
    ("JSON nested too deeply", b'{"text": ' + b"[" * 20_000 + b"]" * 20_000 + b"}\n", 422, "line 1"),
    ("oversize, by its Content-Length", b'{"text": "' + b"x" * 200_000 + b'"}\n', 413, "limit"),
    ("oversize, counted while copying", b'{"text": "' + b"x" * 90_000 + b'"}\n', 413, "limit"),
]


@pytest.mark.parametrize("name,content,status,expected", UPLOAD_CASES, ids=[c[0] for c in UPLOAD_CASES])
def test_bad_upload(client, key, sessions, storage, name, content, status, expected):
    before = _counts(sessions)
    body = _check(upload(client, key, content), status, expected)
    if "line" in expected:
        assert body["report"]["errors"][0]["line"] == int(expected.split()[1])
    assert _counts(sessions) == before
    assert storage.list("datasets") == []
    uploads = client.app.state.settings.data_dir / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []


def test_chunked_oversize_upload_is_cut_off(client, key, storage):
    def body():
        boundary = b"--xyz\r\n"
        yield boundary + b'Content-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        for _ in range(40):
            yield b"x" * 10_000
        yield b"\r\n--xyz--\r\n"

    response = client.post("/datasets", headers={**auth(key), "Content-Type": "multipart/form-data; boundary=xyz"}, content=body())
    assert response.status_code == 413, response.text
    assert storage.list("datasets") == []


def test_upload_with_a_row_over_max_row_kb(client, key, monkeypatch):
    # A worker tokenizes whole rows (about 100 bytes of memory a token), so a row is bounded too.
    monkeypatch.setattr(client.app.state, "settings", client.app.state.settings.model_copy(update={"max_row_kb": 1}))
    rows = b'{"text": "short"}\n{"text": "' + b"x" * 2000 + b'"}\n'
    body = _check(upload(client, key, rows), 422, "line 2")
    assert body["report"]["errors"] == [{"line": 2, "message": "the row is 2 KiB, more than the 1 KiB a row may have"}]


def test_upload_error_count_is_the_files_not_the_reports(client, key):
    body = _check(upload(client, key, b"{bad\n" * 30), 422, "30 error(s)")
    assert body["report"]["error_count"] == 30 and len(body["report"]["errors"]) < 30


def test_upload_without_a_file(client, key):
    _check(client.post("/datasets", headers=auth(key), data={"x": "1"}), 422, "body.file")
    # A part named file but without a filename is a text field to the multipart parser.
    body = _check(client.post("/datasets", headers=auth(key), files={"file": ("", b'{"text": "x"}\n')}), 422, "body.file")
    assert body["detail"] == "body.file: must be a file: a multipart part with a filename"


def test_upload_of_two_files_is_refused_not_half_kept(client, key, sessions):
    parts = [("file", ("a.jsonl", jsonl(ALPACA_ROWS))), ("file", ("b.jsonl", jsonl(ALPACA_ROWS)))]
    body = _check(client.post("/datasets", headers=auth(key), files=parts), 422, "body.file")
    assert body["detail"] == "body.file: one file per upload, got 2: send each dataset in its own request"
    assert client.get("/datasets", headers=auth(key)).json()["data"] == []


def test_upload_needs_a_key(client):
    _check(client.post("/datasets", files={"file": ("a.jsonl", jsonl(ALPACA_ROWS))}), 401, "missing API key")


def test_an_anonymous_body_is_refused_before_it_is_read(client):
    sent = []

    def body():
        for chunk in range(40):
            sent.append(chunk)
            yield b"x" * 10_000

    for url in ("/datasets", "/jobs"):
        sent.clear()
        response = client.post(url, headers={"Content-Type": "multipart/form-data; boundary=xyz"}, content=body())
        _check(response, 401, "missing API key")
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert len(sent) <= 1  # at most the first chunk left the client: nothing was spooled
    # Malformed JSON from an anonymous client learns nothing about validation either.
    _check(client.post("/jobs", headers={"Content-Type": "application/json"}, content=b"{not json"), 401, "missing API key")


OTHER_TENANT_ROUTES = [
    ("GET", "/jobs/{job}"),
    ("POST", "/jobs/{job}/cancel"),
    ("DELETE", "/jobs/{job}"),
    ("GET", "/jobs/{job}/metrics"),
    ("GET", "/jobs/{job}/events"),
    ("GET", "/jobs/{job}/adapter"),
    ("GET", "/jobs/{job}/checkpoints"),
    ("GET", "/datasets/{dataset}"),
    ("DELETE", "/datasets/{dataset}"),
]


@pytest.mark.parametrize("method,path", OTHER_TENANT_ROUTES, ids=[f"{m} {p}" for m, p in OTHER_TENANT_ROUTES])
def test_another_tenants_objects_are_not_found(client, key, other_key, sessions, method, path):
    dataset_id = make_dataset(client, key)
    job_id = client.post("/jobs", headers=auth(key), json=job_body(dataset_id)).json()["id"]
    url = path.format(job=job_id, dataset=dataset_id)
    response = client.request(method, url, headers=auth(other_key))
    assert response.status_code == 404 and "not found" in response.json()["detail"]
    # ... and the owner still sees them untouched.
    assert client.get(f"/jobs/{job_id}", headers=auth(key)).json()["status"] == "queued"
    assert client.get(f"/datasets/{dataset_id}", headers=auth(key)).status_code == 200
    listed = client.get("/jobs", headers=auth(other_key)).json()["data"]
    assert listed == []


QUERY_CASES = [
    ("/jobs?status=done", "query.status"),
    ("/jobs?limit=0", "query.limit"),
    ("/jobs?limit=1000", "query.limit"),
    ("/datasets?limit=-1", "query.limit"),
    ("/jobs?after=x%00", "query.after"),
    ("/datasets?after=%00", "query.after"),
    # A cursor must be one of the tenant's ids of that resource (it was a quiet wrong page).
    ("/jobs?after=job_nope", "query.after"),
    ("/jobs?after=ds_x", "query.after"),
    ("/datasets?after=ds_nope", "query.after"),
    ("/datasets?after=job_x", "query.after"),
    ("/jobs?dataset_id=ds_nope", "query.dataset_id"),
    ("/jobs?method=qlora", "query.method"),
    ("/jobs/compare?ids=job_a", "query.ids"),
    ("/jobs/job_x%00", "path.job_id"),
    ("/jobs/job_x%00/metrics", "path.job_id"),
    ("/datasets/ds_x%00", "path.dataset_id"),
    ("/models/tiny-llama%00", "path.name"),
]


@pytest.mark.parametrize("url,field", QUERY_CASES)
def test_bad_query_parameters(client, key, url, field):
    _check(client.get(url, headers=auth(key)), 422, field)


def test_another_tenants_id_is_no_cursor(client, key, other_key, ctx):
    job_id = client.post("/jobs", headers=auth(other_key), json=job_body(ctx["other_dataset"])).json()["id"]
    body = _check(client.get(f"/jobs?after={job_id}", headers=auth(key)), 422, "query.after")
    assert body["detail"] == f"query.after: no job '{job_id}' to continue after: pass the last_id of the previous page of jobs"
    _check(client.get(f"/datasets?after={ctx['other_dataset']}", headers=auth(key)), 422, "query.after")
    # The owner pages on from them.
    assert client.get(f"/jobs?after={job_id}", headers=auth(other_key)).json()["data"] == []
    assert client.get(f"/datasets?after={ctx['other_dataset']}", headers=auth(other_key)).status_code == 200


def test_a_deleted_dataset_is_still_a_cursor(client, key, ctx):
    older = ctx["dataset"]
    newer = make_dataset(client, key)
    assert client.delete(f"/datasets/{newer}", headers=auth(key)).status_code == 200
    page = client.get(f"/datasets?after={newer}", headers=auth(key)).json()
    assert [d["id"] for d in page["data"]] == [older]


def test_bad_metrics_query(client, key, ctx):
    job_id = client.post("/jobs", headers=auth(key), json=job_body(ctx["dataset"])).json()["id"]
    _check(client.get(f"/jobs/{job_id}/metrics?after_step=-3", headers=auth(key)), 422, "query.after_step")
    _check(client.get(f"/jobs/{job_id}/metrics?kind=loss", headers=auth(key)), 422, "query.kind: must be 'train' or 'eval', got 'loss'")
    # Past the 32-bit step column: a 422, not an overflow in the query.
    _check(client.get(f"/jobs/{job_id}/metrics?after_step={'9' * 20}", headers=auth(key)), 422, "query.after_step")
