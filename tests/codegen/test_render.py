import pytest

from codegen import render as R
from codegen.render import Code
from dsl.errors import CodegenError


@pytest.mark.parametrize("bad", ["x; import os", "1 + 1", "a b", "__import__('os')", "x\ny"])
def test_free_text_never_reaches_source(bad):
    with pytest.raises(CodegenError, match="not an identifier"):
        R.validate_context({"name": bad})


@pytest.mark.parametrize("bad", [1 << 70, float("nan"), float("inf"), object()])
def test_out_of_range_values_rejected(bad):
    with pytest.raises(CodegenError):
        R.validate_context({"v": [bad]})


def test_allowed_values():
    R.validate_context({"a": 1, "b": True, "c": "tl.float32", "d": Code("x + 1"), "e": [{"f": 2.5}]})


def test_strict_undefined_is_a_codegen_error():
    with pytest.raises(CodegenError, match="undefined"):
        R.render("pointwise.j2", kernel="k")


def test_unknown_template():
    with pytest.raises(CodegenError, match="unknown template"):
        R.render("nope.j2")


def test_hash_includes_triton_version(monkeypatch):
    h1 = R.source_hash("x = 1\n")
    monkeypatch.setattr(R, "triton_version", lambda: "0.0.0-other")
    assert R.source_hash("x = 1\n") != h1


def test_load_module_caches_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSL_CACHE_DIR", str(tmp_path))
    src = "VALUE = 41 + 1\n"
    mod = R.load_module(src, "probe")
    assert mod.VALUE == 42
    assert (tmp_path / "kernels").glob("kdsl_gen_probe_*.py")
    assert R.load_module(src, "probe") is mod
    with pytest.raises(CodegenError, match="invalid module name"):
        R.load_module("Y = 1\n", "bad name")
