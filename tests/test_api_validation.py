"""Bad input gets a 4xx answer that names the problem; good items in the same upload are kept."""

from __future__ import annotations

import pytest

from tests.conftest import create

GOOD = {"id": "g", "instruction": "Say hi.", "candidates": [{"source": "a", "response": "Hi!"}]}


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"instruction": "x", "candidates": []}, "candidates"),
        ({"candidates": [{"response": "r"}]}, "exactly one of 'instruction' or 'messages'"),
        ({"instruction": "x", "candidates": [{"response": 3}]}, "candidates.0.response"),
        ({"instruction": "x", "candidates": [{"response": ""}]}, "candidates.0.response"),
        ({"instruction": "x", "candidates": [{"source": "a"}]}, "candidates.0.response"),
        ({"instruction": 5, "candidates": [{"response": "r"}]}, "instruction"),
        ({"instruction": "  ", "candidates": [{"response": "r"}]}, "'instruction' is empty"),
        (
            {
                "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "candidates": [{"response": "r"}],
            },
            "must end with a user turn",
        ),
        ({"messages": [{"role": "robot", "content": "a"}], "candidates": [{"response": "r"}]}, "messages.0.role"),
        ("not an object", "expected a JSON object"),
    ],
)
def test_bad_item_is_rejected_by_index_and_field_while_good_ones_are_accepted(api, item, field) -> None:
    ds = create(api)
    r = api.post(f"/v1/datasets/{ds}/items", json={"items": [GOOD, item]})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 1
    (rej,) = body["rejected"]
    assert rej["index"] == 1
    assert field in rej["error"]


def test_upload_with_only_bad_items_is_422_with_reasons(api) -> None:
    ds = create(api)
    r = api.post(f"/v1/datasets/{ds}/items", json={"items": [{"instruction": "x", "candidates": []}]})
    assert r.status_code == 422
    assert "no item accepted" in r.json()["detail"]
    assert r.json()["rejected"][0]["index"] == 0


@pytest.mark.parametrize(
    ("body", "ctype", "status", "text"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b"", "application/json", 400, "empty body"),
        (b'{"things": []}', "application/json", 422, '{"items": [...]}'),
        (b'[{"instruction": "x"}]', "application/json", 422, '{"items": [...]}'),
        (b'{"items": [{"instruction": "\xff\xfe", "candidates": []}]}', "application/json", 400, "not valid JSON"),
    ],
)
def test_malformed_bodies(api, body, ctype, status, text) -> None:
    ds = create(api)
    r = api.post(f"/v1/datasets/{ds}/items", content=body, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    assert text in r.json()["detail"]


def test_ndjson_with_one_broken_line_keeps_the_good_lines(api) -> None:
    ds = create(api)
    body = (
        b'{"id": "a", "instruction": "q1", "candidates": [{"response": "r"}]}\n'
        b"{broken\n"
        b'{"id": "b", "instruction": "q2", "candidates": [{"response": "\xff"}]}\n'
        b'{"id": "c", "instruction": "q3", "candidates": [{"response": "r"}]}\n'
    )
    r = api.post(f"/v1/datasets/{ds}/items", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 202
    out = r.json()
    assert out["accepted"] == 2
    assert [x["index"] for x in out["rejected"]] == [1, 2]
    assert all("line" in x["error"] for x in out["rejected"])
    assert api.get(f"/v1/datasets/{ds}").json()["items"] == 2


def test_unknown_ids_are_404(api) -> None:
    assert api.get("/v1/datasets/ds-nope").status_code == 404
    assert "ds-nope" in api.get("/v1/datasets/ds-nope").json()["detail"]
    assert api.post("/v1/datasets/ds-nope/items", json={"items": [GOOD]}).status_code == 404
    assert api.get("/v1/datasets/ds-nope/selection").status_code == 404
    ds = create(api)
    r = api.get(f"/v1/datasets/{ds}/items/missing")
    assert r.status_code == 404 and "missing" in r.json()["detail"]


def test_dataset_creation_is_validated(api) -> None:
    r = api.post("/v1/datasets", json={"name": "x", "target_model": "smollm2-135m", "template": "fancy"})
    assert r.status_code == 422 and "template" in r.text
    r = api.post("/v1/datasets", json={"name": "x"})
    assert r.status_code == 422 and "target_model" in r.text


def test_selection_parameters_are_validated(api) -> None:
    ds = create(api)
    r = api.get(f"/v1/datasets/{ds}/selection", params={"strategy": "grap"})
    assert r.status_code == 422 and "did you mean grape" in r.json()["detail"]
    assert api.get(f"/v1/datasets/{ds}/selection", params={"k": 0}).status_code == 422
    assert api.get(f"/v1/datasets/{ds}/selection", params={"reduce": "max"}).status_code == 422


def test_limits(api, settings) -> None:
    ds = create(api)
    many = {"instruction": "x", "candidates": [{"response": "r"}] * (settings.max_candidates_per_item + 1)}
    r = api.post(f"/v1/datasets/{ds}/items", json={"items": [GOOD, many]})
    assert "candidates" in r.json()["rejected"][0]["error"]
    huge = {"instruction": "x", "candidates": [{"response": "r" * (settings.max_response_chars + 1)}]}
    r = api.post(f"/v1/datasets/{ds}/items", json={"items": [GOOD, huge]})
    assert "candidates.0.response" in r.json()["rejected"][0]["error"]


def test_health_and_openapi(api) -> None:
    assert api.get("/healthz").json() == {"status": "ok", "redis": True, "version": "0.1.0"}
    paths = api.get("/openapi.json").json()["paths"]
    for p in ("/v1/datasets", "/v1/datasets/{dataset_id}/items", "/v1/datasets/{dataset_id}/selection"):
        assert p in paths
    assert api.get("/docs").status_code == 200
