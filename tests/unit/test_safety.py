"""Untrusted files load safely: no unpickling, no remote code unless asked, shard indexes confined to the model dir,
chat templates sandboxed."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest

from effine.errors import DataError, ModelError

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "bench").rglob("*.py"), *(ROOT / "tools").rglob("*.py")])


def _calls(name: str):
    """(file:line, call) for every call of an attribute or function called ``name`` in effine's code."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                if (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)) == name:
                    yield f"{path.relative_to(ROOT)}:{node.lineno}", node


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_no_unsafe_unpickling_anywhere():
    assert len(SOURCES) > 50
    loads = list(_calls("load"))
    torch_loads = [(w, c) for w, c in loads if ast.unparse(c.func) == "torch.load"]
    assert torch_loads  # the check sees the calls that exist (optimizer state, opt-in .bin adapters)
    bad = [w for w, c in torch_loads if not (isinstance(_kw(c, "weights_only"), ast.Constant)
                                             and _kw(c, "weights_only").value is True)]
    assert not bad, f"torch.load without weights_only=True: {bad}"
    np_loads = [(w, c) for w, c in loads if ast.unparse(c.func) in ("np.load", "numpy.load")]
    assert not [w for w, c in np_loads if ast.unparse(_kw(c, "allow_pickle") or ast.Constant(None)) != "False"]
    text = "\n".join(p.read_text() for p in SOURCES)
    for unsafe in ("import pickle", "pickle.load", "import dill", "yaml.unsafe_load", "UnsafeLoader", "FullLoader",
                   "import joblib"):
        assert unsafe not in text, unsafe


def test_remote_code_only_when_asked():
    calls = list(_calls("from_pretrained"))
    assert len(calls) > 5
    forced = [w for w, c in calls if ast.unparse(_kw(c, "trust_remote_code") or ast.Constant(False)) == "True"]
    assert not forced
    from effine.config import ModelConfig
    from effine.export.ptq import ptq_export
    from effine.model.loader import load_model, load_tokenizer

    assert ModelConfig().trust_remote_code is False
    for fn in (load_model, load_tokenizer, ptq_export):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                   "..\\x.safetensors"])
def test_a_shard_index_pointing_outside_the_model_dir_is_refused(tmp_path, shard):
    from effine.model.loader import load_model, resolve_model_dir

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model-00001-of-00002.safetensors").write_bytes(b"")
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors", "lm_head.weight": shard}}))
    expected = r"model.safetensors.index.json: weight_map\['lm_head.weight'\] = .* points outside the model dir"
    with pytest.raises(ModelError, match=expected):
        resolve_model_dir(str(model))
    with pytest.raises(ModelError, match=expected):
        load_model(model)


def test_a_well_formed_shard_index_passes(tmp_path):
    from effine.model.loader import check_shard_index

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "sub/model-00002-of-00002.safetensors"}}))
    check_shard_index(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    with pytest.raises(ModelError, match="not a valid shard index"):
        check_shard_index(tmp_path)


ESCAPES = ["{{ messages.__class__.__mro__[1].__subclasses__() }}",
           "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
           "{% for m in messages %}{{ m.content.__class__.__base__.__subclasses__() }}{% endfor %}"]


@pytest.mark.parametrize("template", ESCAPES)
def test_chat_templates_run_in_the_sandbox(smol_tokenizer, template):
    from effine.data.formats import Sample
    from effine.data.template import Encoder
    from effine.eval.generate import prompt_ids_for

    sample = Sample("c.jsonl:1", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    enc = Encoder(smol_tokenizer, chat_template=template, log=lambda _: None)
    with pytest.raises(DataError, match=r"data.chat_template \(Jinja string\): the template tried something Jinja's "
                                        r"sandbox forbids .*remove that expression"):
        enc.encode(sample)
    with pytest.raises(DataError, match="sandbox forbids"):
        prompt_ids_for(smol_tokenizer, "hi", chat_template=template)
