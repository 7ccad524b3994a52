"""The corpus: sources read from archives, tokenizer round trip, shards, packed batches and exact resume."""

from __future__ import annotations

import bz2
import io
import json
import lzma
import subprocess
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from dsl.errors import TrainingError
from runtime.train import data, sources
from runtime.train.sources import Document

WORDS = {
    "code": ["def", "return", "self", "import", "class", "(x):", "None", "for", "in", "range"],
    "prose": ["the", "function", "returns", "a", "value", "module", "describes", "object", "and", "of"],
    "news": ["minister", "said", "today", "police", "sydney", "government", "killed", "attack", "on", "the"],
}


def _docs(domain, n=12, words=60, seed=0):
    rng = np.random.default_rng([seed, len(domain)])
    vocab = WORDS[domain]
    return [Document(f"{domain}/{i:03d}", " ".join(rng.choice(vocab, size=words)) + "\n") for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    manifest = data.build_corpus({d: _docs(d) for d in WORDS}, out, vocab_size=300, seed=3, heldout_fraction=0.25)
    return out, manifest


def test_manifest_and_shards(corpus):
    out, manifest = corpus
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for name, entry in manifest["domains"].items():
        assert entry["splits"]["train"]["documents"] == 9 and entry["splits"]["heldout"]["documents"] == 3
        arr = np.load(out / f"{name}.train.npy")
        assert arr.dtype == np.uint16 and arr.size == entry["splits"]["train"]["tokens"]
        assert (arr == manifest["eos_id"]).sum() == 9                     # one end-of-text per document


def test_tokenizer_round_trip(corpus):
    out, _ = corpus
    tok = data.load_tokenizer(out)
    for text in ["def f(x):\n    return x  # tabs\tand ünïcode ✓", "the minister said  today\n\n"]:
        assert tok.decode(tok.encode(text).ids) == text
    ids = np.load(out / "prose.train.npy")
    first = ids[: int(np.argmax(ids == 0))]
    assert tok.decode(first.tolist()).split()[0] in WORDS["prose"]


def test_split_is_deterministic_by_seed():
    docs = _docs("news", n=40)
    a = data.split_documents(docs, 0.2, seed=1, domain_index=0)
    assert a == data.split_documents(list(reversed(docs)), 0.2, seed=1, domain_index=0)
    b = data.split_documents(docs, 0.2, seed=2, domain_index=0)
    assert len(a[1]) == 8 and a[1] != b[1]
    assert {d.key for d in a[0]} | {d.key for d in a[1]} == {d.key for d in docs}


def test_packed_batches_windows_and_labels(corpus):
    out, _manifest = corpus
    ds = data.PackedDataset(out, seq_len=16, batch_size=4, seed=0)
    batch = ds.next_batch()
    assert batch.tokens.shape == (4, 17) and batch.inputs.shape == (4, 16)
    torch.testing.assert_close(batch.inputs[:, 1:], batch.targets[:, :-1])
    for row, dom in zip(batch.tokens, batch.domains):
        shard = np.load(out / f"{ds.domains[dom]}.train.npy").astype(np.int64)
        starts = [i for i in range(0, shard.size - 16, 16) if (shard[i:i + 17] == row.numpy()).all()]
        assert starts, "every window is a slice of its labelled domain"


def test_deterministic_resume_and_epochs(corpus):
    out, _ = corpus
    ds = data.PackedDataset(out, seq_len=16, batch_size=6, seed=5)
    stream = [ds.next_batch() for _ in range(3)]
    state = ds.state_dict()
    rest = [ds.next_batch().tokens for _ in range(ds.num_windows // 6 + 2)]      # crosses an epoch
    assert ds.epoch >= 1
    resumed = data.PackedDataset(out, seq_len=16, batch_size=6, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))                     # serialisable
    for expected in rest:
        assert torch.equal(resumed.next_batch().tokens, expected)
    again = data.PackedDataset(out, seq_len=16, batch_size=6, seed=5)
    assert all(torch.equal(again.next_batch().tokens, b.tokens) for b in stream)
    other = data.PackedDataset(out, seq_len=16, batch_size=6, seed=6)
    assert not torch.equal(other.next_batch().tokens, stream[0].tokens)
    with pytest.raises(TrainingError, match="seq_len"):
        data.PackedDataset(out, seq_len=8, batch_size=6, seed=5).load_state_dict(state)


def test_data_parallel_ranks_split_the_global_batch(corpus):
    out, _ = corpus
    whole = data.PackedDataset(out, seq_len=16, batch_size=4, seed=1)
    ranks = [data.PackedDataset(out, seq_len=16, batch_size=4, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        expected = whole.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([p.tokens for p in parts]), expected.tokens)
        assert torch.equal(torch.cat([p.domains for p in parts]), expected.domains)
    with pytest.raises(TrainingError, match="not divisible"):
        data.PackedDataset(out, seq_len=16, batch_size=5, world_size=2, rank=0)
    evals = [list(data.PackedDataset(out, "heldout", seq_len=16, batch_size=4, rank=r, world_size=2)
                  .eval_batches()) for r in range(2)]
    total = sum(b.tokens.shape[0] for part in evals for b in part)
    assert total == data.PackedDataset(out, "heldout", seq_len=16, batch_size=4).num_windows


def test_missing_or_corrupt_corpus(tmp_path, corpus):
    with pytest.raises(TrainingError, match="kdsl data prepare"):
        data.PackedDataset(tmp_path, seq_len=8, batch_size=2)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(TrainingError, match="corrupt"):
        data.load_manifest(tmp_path)
    out, _ = corpus
    with pytest.raises(TrainingError, match="unknown domain"):
        data.PackedDataset(out, seq_len=8, batch_size=2, domains=["math"])


# ------------------------------------------------------------------------------------------ sources

def _ar(members):
    blob = b"!<arch>\n"
    for name, payload in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode()
        blob += header + payload + (b"\n" if len(payload) % 2 else b"")
    return blob


def _fake_doc_deb(path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in [("./usr/share/doc/python3.11/html/_sources/library/os.rst.txt", "The os module.\n" * 40),
                           ("./usr/share/doc/python3.11/html/_sources/tutorial/intro.rst.txt", "An informal intro.\n" * 40),
                           ("./usr/share/doc/python3.11/html/_sources/faq/general.rst.txt", "General Python FAQ.\n" * 40),
                           ("./usr/share/doc/python3.11/html/index.html", "<html></html>")]:
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    path.write_bytes(_ar([("debian-binary", b"2.0\n"), ("data.tar.xz", lzma.compress(buf.getvalue()))]))
    return path


WIKI_XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>Aardvark</title><ns>0</ns><revision><text xml:space="preserve">{{Taxobox|name=x}}
'''Aardvark''' is a [[mammal|burrowing mammal]] native to [[Africa]].&lt;ref&gt;cite&lt;/ref&gt; It eats ants and termites, digging with strong claws at night across the savanna.
== Diet ==
It feeds mostly on [[ant]]s. [http://example.org Source] [[File:A.jpg|thumb|An [[aardvark]]]]
{| class="wikitable"
| cell
|}
More prose about its long snout, its tongue and the burrows other animals reuse afterwards.</text></revision></page>
<page><title>Ant</title><ns>0</ns><revision><text>Ants are eusocial [[insect]]s of the family Formicidae that, along with the related wasps and bees, belong to the order Hymenoptera. They evolved from vespoid wasp ancestors in the Cretaceous and diversified after the rise of flowering plants, reaching more than 13,800 species today.</text></revision></page>
<page><title>Redirected</title><ns>0</ns><revision><text>#REDIRECT [[Aardvark]]</text></revision></page>
<page><title>Talk:Aardvark</title><ns>1</ns><revision><text>a talk page that is long enough to be kept if it were an article; it is not, so it goes.</text></revision></page>
</mediawiki>"""


def _fake_gensim_wheel(path):
    with zipfile.ZipFile(path, "w") as zf:
        news = "Police said today a fire near Sydney \xa3 was contained.\nThe minister spoke.\n\nA third story.\n"
        zf.writestr(sources.GENSIM_TEST_DATA + "lee_background.cor", news.encode("cp1252"))
        zf.writestr(sources.GENSIM_TEST_DATA + sources.WIKI_FILES[0], bz2.compress(WIKI_XML.encode()))
    return path


def test_doc_sources_read_from_deb(tmp_path):
    docs = sources.read_doc_sources(_fake_doc_deb(tmp_path / "python3.11-doc_1_all.deb"))
    assert [d.key for d in docs] == ["faq/general.rst.txt", "library/os.rst.txt", "tutorial/intro.rst.txt"]
    (tmp_path / "bad.deb").write_bytes(b"garbage")
    with pytest.raises(TrainingError, match="apt-get download python3.11-doc"):
        sources.read_doc_sources(tmp_path / "bad.deb")


def test_gensim_wheel_news_and_wiki(tmp_path):
    got = sources.read_gensim_wheel(_fake_gensim_wheel(tmp_path / "gensim-0-py3-none-any.whl"))
    assert next(d.text for d in got["news"]).endswith("Sydney £ was contained.") and len(got["news"]) == 3
    assert [d.key for d in got["wiki"]] == [f"{sources.WIKI_FILES[0]}:Aardvark", f"{sources.WIKI_FILES[0]}:Ant"]
    text = got["wiki"][0].text
    assert "Aardvark is a burrowing mammal native to Africa. It eats ants" in text
    for junk in ("{{", "[[", "<ref", "cite", "wikitable", "thumb", "http"):
        assert junk not in text
    assert "Diet\nIt feeds mostly on ants. Source" in text


def test_download_failures_name_the_command(tmp_path, monkeypatch):
    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package python3.11-doc")

    monkeypatch.setattr(sources.subprocess, "run", failing)
    with pytest.raises(TrainingError, match=r"apt-get update && apt-get download python3.11-doc"):
        sources.download_deb("python3.11-doc", tmp_path)
    with pytest.raises(TrainingError, match=r"pip download gensim --no-deps --only-binary=:all:"):
        sources.download_wheel("gensim", tmp_path)


def test_prepare_cli_on_tiny_sources(tmp_path, capsys):
    from runtime.cli import main

    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    for i in range(4):
        (lib / "pkg" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    (lib / "site-packages").mkdir()
    (lib / "site-packages" / "skip.py").write_text("raise SystemExit\n")
    out = tmp_path / "corpus"
    argv = ["data", "prepare", "--out", str(out), "--vocab", "300", "--heldout", "0.3", "--lib-dir", str(lib),
            "--doc-deb", str(_fake_doc_deb(tmp_path / "d.deb")),
            "--gensim-wheel", str(_fake_gensim_wheel(tmp_path / "g.whl"))]
    assert main(argv) == 0
    manifest = data.load_manifest(out)
    assert sorted(manifest["domains"]) == ["code", "docs", "news", "wiki"]
    assert manifest["domains"]["code"]["splits"]["train"]["documents"] + \
        manifest["domains"]["code"]["splits"]["heldout"]["documents"] == 4
    assert main(argv) == 0 and "already prepared" in capsys.readouterr().out
    assert main(["data", "info", "--dir", str(out)]) == 0
    assert main(["data", "prepare", "--out", str(tmp_path / "x"), "--vocab", "70000", "--lib-dir", str(lib),
                 "--doc-deb", str(tmp_path / "d.deb"), "--gensim-wheel", str(tmp_path / "g.whl")]) == 2
