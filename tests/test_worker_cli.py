"""`grape worker`'s backend options reach the backend: sharing on by default, off with --no-share-prefix."""

from __future__ import annotations

from grape.models import resolve_model
from grape.settings import get_settings
from workers.backends import load_backend
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
