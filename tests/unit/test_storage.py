"""The object-store layer on a local directory: keys, round trips, conditional writes, digests."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune_registry.digests import canonical_json, digest_dir, digest_json, sha256_file
from kubetune_registry.storage import (
    InvalidURI,
    LocalStore,
    ObjectInfo,
    ObjectNotFound,
    PreconditionFailed,
    S3Store,
    StorageError,
    StoreSettings,
    UnsafeKeyError,
    _DirTransfers,
    open_uri,
    safe_join,
    validate_key,
)

HOSTILE_KEYS = [
    "../evil",
    "a/../../evil",
    "/etc/passwd",
    "a\\..\\evil",
    "a//b",
    "a/b/",
    "./a",
    "a/./b",
    "",
    "a/\x00b",
    "a/\nb",
    "‥/evil",  # TWO DOT LEADER: NFKC -> '..'
    "a／..／evil",  # FULLWIDTH SOLIDUS
    "a∕evil",  # DIVISION SLASH
    "a⁄evil",  # FRACTION SLASH
    "a＼evil",  # FULLWIDTH REVERSE SOLIDUS
    "a\u202eb",  # RIGHT-TO-LEFT OVERRIDE (format character)
]


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": bytes(range(256)) * 40,
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
        "deep/er/nested file.txt": "unicode ✓ ok".encode(),
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_hostile_keys_are_refused_with_the_key_in_the_message(key: str, tmp_path: Path) -> None:
    with pytest.raises(UnsafeKeyError) as info:
        safe_join(tmp_path, key)
    if key:
        assert repr(key) in str(info.value)


@pytest.mark.parametrize(
    "key", ["a", "a/b.c", "merged/model-00001-of-00002.safetensors", ".gitattributes", "ünï/cödé"]
)
def test_ordinary_keys_are_accepted(key: str, tmp_path: Path) -> None:
    assert validate_key(key) == key
    assert safe_join(tmp_path, key) == (tmp_path / key).resolve()


def test_safe_join_refuses_a_symlink_that_leads_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafeKeyError, match="resolves outside"):
        safe_join(root, "link/escaped")


def test_local_store_round_trips_a_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src)
    store = LocalStore(tmp_path / "store")
    keys = store.upload_dir(src, "models/m1", exclude=("*.txt",))
    assert sorted(keys) == sorted(f"models/m1/{k}" for k in files if not k.endswith(".txt"))
    listed = list(store.list("models/m1/"))
    assert [i.key for i in listed] == sorted(keys)
    assert {i.key: i.size for i in listed}["models/m1/model.safetensors"] == len(files["model.safetensors"])

    dest = tmp_path / "dest"
    paths = store.download_dir("models/m1", dest)
    assert len(paths) == 3
    for rel, data in files.items():
        if not rel.endswith(".txt"):
            assert (dest / rel).read_bytes() == data
    assert not (dest / "deep").exists()

    assert store.delete_prefix("models/") == 3
    assert list(store.list("")) == []
    assert not (tmp_path / "store" / "models").exists(), "emptied folders are removed like S3 has none"


def test_list_is_a_string_prefix_and_hides_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("a/x.json", b"1")
    store.put_bytes("a/xy.json", b"2")
    store.put_bytes("ab/z.json", b"3")
    (tmp_path / "a" / ".x.json.kubetune-tmp-123").write_bytes(b"half")
    assert [i.key for i in store.list("a/x")] == ["a/x.json", "a/xy.json"]
    assert [i.key for i in store.list("a")] == ["a/x.json", "a/xy.json", "ab/z.json"]
    assert [i.key for i in store.list("a/")] == ["a/x.json", "a/xy.json"]


def test_local_conditional_writes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    etag1 = store.put_bytes("k.json", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed, match="already exists"):
        store.put_bytes("k.json", b"second", if_none_match=True)
    assert store.get_bytes("k.json") == (b"first", etag1)

    etag2 = store.put_bytes("k.json", b"second", if_match=etag1)
    assert etag2 != etag1
    with pytest.raises(PreconditionFailed, match="changed since"):
        store.put_bytes("k.json", b"third", if_match=etag1)
    assert store.get_bytes("k.json")[0] == b"second"
    with pytest.raises(PreconditionFailed, match="does not exist"):
        store.put_bytes("missing.json", b"x", if_match=etag2)
    with pytest.raises(ObjectNotFound):
        store.get_bytes("missing.json")


def test_local_if_none_match_has_exactly_one_winner_under_threads(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    barrier = threading.Barrier(8)
    winners: list[int] = []

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            store.put_bytes("claim.json", str(i).encode(), if_none_match=True)
            winners.append(i)
        except PreconditionFailed:
            pass

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert store.get_bytes("claim.json")[0] == str(winners[0]).encode()


def test_local_if_match_serialises_read_modify_write(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("counter", b"0")

    def bump() -> None:
        for _ in range(20):
            while True:
                data, etag = store.get_bytes("counter")
                try:
                    store.put_bytes("counter", str(int(data) + 1).encode(), if_match=etag)
                    break
                except PreconditionFailed:
                    continue

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get_bytes("counter")[0] == b"80", "no increment may be lost"


class _HostileListing(_DirTransfers):
    """A store whose listing contains a key chosen by an attacker."""

    def __init__(self, keys: list[str]) -> None:
        self._max_concurrency = 2
        self.keys = keys
        self.downloaded: list[Path] = []

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for key in self.keys:
            yield ObjectInfo(key=key, size=1, etag="x")

    def download_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        self.downloaded.append(path)


@pytest.mark.parametrize("bad", ["p/../../escape", "p//x", "p/‥/x", "p/a／b"])
def test_download_dir_refuses_a_hostile_listing_before_writing_anything(bad: str, tmp_path: Path) -> None:
    store = _HostileListing(["p/good.txt", bad])
    dest = tmp_path / "inner" / "dest"
    with pytest.raises(UnsafeKeyError):
        store.download_dir("p", dest)
    assert store.downloaded == []
    assert not any(tmp_path.rglob("*.txt")) and not (tmp_path / "escape").exists()


def test_open_uri(tmp_path: Path) -> None:
    store, prefix = open_uri(f"{tmp_path.as_uri()}/", StoreSettings())
    assert isinstance(store, LocalStore) and store.root == tmp_path and prefix == ""

    store, prefix = open_uri("s3://my-bucket/models/team-a/", StoreSettings(local_root=str(tmp_path)))
    assert (
        isinstance(store, LocalStore) and store.root == tmp_path / "my-bucket" and prefix == "models/team-a"
    )

    store, prefix = open_uri(
        "s3://my-bucket", StoreSettings(endpoint="http://127.0.0.1:1", region="us-east-1")
    )
    assert isinstance(store, S3Store) and store.bucket == "my-bucket" and prefix == ""

    for bad in ["s3://my-bucket/a/../b", "s3://my-bucket/a//b", "file:///tmp/../etc"]:
        with pytest.raises(UnsafeKeyError):
            open_uri(bad, StoreSettings())
    for bad in ["s3://UPPER/x", "s3://../x", "file://host/x", "gs://bucket/x", "relative/path", "s3://ab"]:
        with pytest.raises(InvalidURI):
            open_uri(bad, StoreSettings())


def test_digest_dir_format_is_the_documented_one(tmp_path: Path) -> None:
    files = make_tree(tmp_path / "d")
    lines = "".join(
        f"{rel}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\n"
        for rel, data in sorted(files.items(), key=lambda kv: kv[0].encode())
    )
    assert digest_dir(tmp_path / "d") == hashlib.sha256(lines.encode()).hexdigest()
    assert sha256_file(tmp_path / "d" / "config.json") == hashlib.sha256(files["config.json"]).hexdigest()

    before = digest_dir(tmp_path / "d")
    (tmp_path / "d" / "config.json").rename(tmp_path / "d" / "config2.json")
    assert digest_dir(tmp_path / "d") != before


def test_digest_json_is_canonical() -> None:
    assert canonical_json({"b": 1, "a": [1, 2], "c": "é"}) == '{"a":[1,2],"b":1,"c":"é"}'.encode()
    assert digest_json({"x": 1, "y": {"b": 2, "a": 1}}) == digest_json({"y": {"a": 1, "b": 2}, "x": 1})
    assert digest_json({"x": 1}) != digest_json({"x": 2})
    with pytest.raises(ValueError):
        digest_json({"x": float("nan")})


def test_unreachable_endpoint_is_a_storage_error_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fixtures.s3 import FAKE_SECRET_ACCESS_KEY, fake_credentials_env

    for key, value in fake_credentials_env().items():
        monkeypatch.setenv(key, value)
    settings = StoreSettings(
        endpoint="http://127.0.0.1:9", region="us-east-1", max_attempts=1, connect_timeout_s=1
    )
    store = S3Store("some-bucket", settings)
    with pytest.raises(StorageError) as info:
        store.get_bytes("models/config.json")
    message = str(info.value)
    assert message.startswith("reading s3://some-bucket/models/config.json failed: EndpointConnectionError")
    assert "127.0.0.1:9" in message
    assert FAKE_SECRET_ACCESS_KEY not in message
