"""Where the training corpus comes from: text that is available offline on these machines.

Each collector returns the documents of one or more domains as ``{domain: [Document, ...]}``.
Downloads go through the ordinary package clients (``apt-get download``, ``pip download``) into a
temporary directory; nothing is installed. Archives are read in place (a .deb is an ``ar`` archive
holding a tar; a wheel is a zip), so no ``dpkg`` and no gensim import is needed.
"""

from __future__ import annotations

import bz2
import dataclasses
import html
import io
import lzma
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from dsl.errors import TrainingError

DOC_PACKAGE = "python3.11-doc"
GENSIM_TEST_DATA = "gensim/test/test_data/"
NEWS_FILES = ("lee_background.cor", "lee.cor")
WIKI_FILES = ("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
              "enwiki-table-markup.xml.bz2")
# Generated or vendored files that are not representative code and would dominate the domain.
_MAX_SOURCE_FILE_BYTES = 256 * 1024


@dataclasses.dataclass(frozen=True)
class Document:
    key: str    # stable identity (path or title): sorting and the held-out split use it
    text: str


# --------------------------------------------------------------------------------------------- code

def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def collect_code(lib_dir: Path | None = None) -> dict[str, list[Document]]:
    """Python source files of the running interpreter's standard library (site-packages excluded)."""
    lib_dir = Path(lib_dir) if lib_dir is not None else stdlib_dir()
    if not lib_dir.is_dir():
        raise TrainingError(f"code domain: the standard library directory {lib_dir} does not exist; "
                            "run `kdsl data prepare` with a Python that has its Lib directory installed")
    docs = []
    for path in sorted(lib_dir.rglob("*.py")):
        rel = path.relative_to(lib_dir).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "__pycache__" in rel:
            continue
        try:
            if path.stat().st_size > _MAX_SOURCE_FILE_BYTES:
                continue
            text = path.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            continue  # a broken symlink in a distro's Lib dir is not worth failing for
        if text.strip():
            docs.append(Document(rel, text))
    if not docs:
        raise TrainingError(f"code domain: no Python source files under {lib_dir}; this interpreter ships "
                            "only bytecode. Install the source (e.g. `apt-get install libpython3.11-stdlib`)")
    return {"code": docs}


# --------------------------------------------------------------------------------------------- docs

def download_deb(package: str, dest: Path) -> Path:
    cmd = ["apt-get", "download", package]
    fix = f"`apt-get update && apt-get download {package}`, then pass --doc-deb PATH"
    try:
        proc = subprocess.run(cmd, check=False, cwd=dest, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise TrainingError(f"docs domain: apt-get is not available to fetch Debian package '{package}'; "
                            f"download the .deb elsewhere and pass --doc-deb PATH") from None
    except subprocess.TimeoutExpired:
        raise TrainingError(f"docs domain: `apt-get download {package}` timed out; retry with {fix}") from None
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise TrainingError(f"docs domain: `apt-get download {package}` failed "
                            f"({detail[-1] if detail else f'exit {proc.returncode}'}); run {fix}")
    return debs[0]


def _ar_members(blob: bytes):
    """Yield (name, data) of a System V ``ar`` archive, the container format of a .deb."""
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        pos += 60
        yield name, blob[pos:pos + size]
        pos += size + (size & 1)  # members are 2-byte aligned


def _open_data_tar(member_name: str, data: bytes) -> tarfile.TarFile:
    if member_name.endswith(".xz"):
        data = lzma.decompress(data)
    elif member_name.endswith(".zst"):
        raise ValueError("zstd-compressed .deb payloads are not supported by Python's standard library")
    # gz, bz2 and plain tar are handled by tarfile's transparent mode
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")


def read_doc_sources(deb_path: Path) -> list[Document]:
    """The reStructuredText sources (html/_sources/**.rst.txt) inside the python3.x-doc package."""
    try:
        blob = Path(deb_path).read_bytes()
        payload = [(n, d) for n, d in _ar_members(blob) if n.startswith("data.tar")]
        if not payload:
            raise ValueError("no data.tar member")
        tar = _open_data_tar(*payload[0])
    except (OSError, ValueError, tarfile.TarError, lzma.LZMAError) as exc:
        raise TrainingError(f"docs domain: cannot read Debian package {deb_path}: {exc}; "
                            f"download it again with `apt-get download {DOC_PACKAGE}`") from None
    docs = []
    with tar:
        for member in tar.getmembers():
            marker = "/_sources/"
            if not member.isfile() or marker not in member.name or not member.name.endswith(".txt"):
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            text = handle.read().decode("utf-8", errors="replace")
            if text.strip():
                docs.append(Document(member.name.split(marker, 1)[1], text))
    if not docs:
        raise TrainingError(f"docs domain: {deb_path} has no html/_sources/*.txt files; is it the "
                            f"{DOC_PACKAGE} package?")
    docs.sort(key=lambda d: d.key)
    return docs


def collect_docs(deb_path: Path | None = None, package: str = DOC_PACKAGE) -> dict[str, list[Document]]:
    if deb_path is not None:
        return {"docs": read_doc_sources(Path(deb_path))}
    with tempfile.TemporaryDirectory(prefix="kdsl-deb-") as tmp:
        tmp_path = Path(tmp)
        tmp_path.chmod(0o777)  # apt drops privileges to _apt for the download when it can
        return {"docs": read_doc_sources(download_deb(package, tmp_path))}


# -------------------------------------------------------------------------------------- news, wiki

def download_wheel(package: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", package, "--no-deps", "--only-binary=:all:",
           "-d", str(dest), "--quiet"]
    fix = f"`pip download {package} --no-deps --only-binary=:all: -d DIR`, then pass --gensim-wheel PATH"
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise TrainingError(f"news/wiki domains: downloading the {package} wheel timed out; run {fix}") from None
    wheels = sorted(dest.glob(f"{package}-*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise TrainingError(f"news/wiki domains: `pip download {package}` failed "
                            f"({detail[-1] if detail else f'exit {proc.returncode}'}); run {fix}")
    return wheels[0]


def _decode_legacy(data: bytes) -> str:
    # The Lee corpus predates UTF-8 everywhere: a few pound signs are Latin-1.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_MEDIA = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]")
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_TAG = re.compile(r"<[^>]+>")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)


def wikitext_to_text(markup: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, refs, media and tags dropped, links kept as text."""
    text = _COMMENT.sub("", markup)
    text = _REF.sub("", text)
    for _ in range(20):  # templates nest; peel innermost first
        text, n = _TEMPLATE.subn("", text)
        if not n:
            break
    text = _TABLE.sub("", text)
    text = _MEDIA.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = text.replace("'''", "").replace("''", "")
    text = html.unescape(text)
    lines = [ln.rstrip() for ln in text.splitlines()]
    text = "\n".join(ln for ln in lines if not ln.lstrip().startswith(("|", "!", "{", "}")))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _wiki_pages(xml_bytes: bytes, source: str) -> list[Document]:
    docs = []
    for _, elem in ET.iterparse(io.BytesIO(xml_bytes)):
        if not elem.tag.endswith("}page") and elem.tag != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem.iter()}
        title = fields["title"].text if "title" in fields else None
        ns = fields["ns"].text if "ns" in fields else "0"
        raw = fields["text"].text if "text" in fields else None
        elem.clear()
        if not title or ns != "0" or not raw or raw.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = wikitext_to_text(raw)
        if len(text) > 200:
            docs.append(Document(f"{source}:{title}", text))
    return docs


def read_gensim_wheel(wheel_path: Path) -> dict[str, list[Document]]:
    """News (the Lee corpus, one article per line) and Wikipedia pages from gensim's test data."""
    try:
        zf = zipfile.ZipFile(wheel_path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise TrainingError(f"news/wiki domains: cannot open the gensim wheel {wheel_path}: {exc}; download it "
                            "again with `pip download gensim --no-deps --only-binary=:all:`") from None
    with zf:
        names = set(zf.namelist())
        news, wiki = [], []
        for fname in NEWS_FILES:
            member = GENSIM_TEST_DATA + fname
            if member in names:
                for i, line in enumerate(_decode_legacy(zf.read(member)).splitlines()):
                    if line.strip():
                        news.append(Document(f"{fname}:{i:05d}", line.strip()))
        for fname in WIKI_FILES:
            member = GENSIM_TEST_DATA + fname
            if member in names:
                try:
                    wiki.extend(_wiki_pages(bz2.decompress(zf.read(member)), fname))
                except (OSError, ET.ParseError, ValueError) as exc:
                    raise TrainingError(f"wiki domain: {member} in {wheel_path} is unreadable: {exc}") from None
    missing = [dom for dom, docs in (("news", news), ("wiki", wiki)) if not docs]
    if missing:
        raise TrainingError(f"{'/'.join(missing)} domain: the gensim wheel {wheel_path} has none of the expected "
                            f"test files under {GENSIM_TEST_DATA} ({', '.join(NEWS_FILES + WIKI_FILES)})")
    return {"news": news, "wiki": wiki}


def collect_gensim(wheel_path: Path | None = None) -> dict[str, list[Document]]:
    if wheel_path is not None:
        return read_gensim_wheel(Path(wheel_path))
    with tempfile.TemporaryDirectory(prefix="kdsl-whl-") as tmp:
        return read_gensim_wheel(download_wheel("gensim", Path(tmp)))
