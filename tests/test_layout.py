"""The HF hub-cache layout: name validation, folder names, symlink targets, the tree."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir, try_to_load_from_cache

from nodecache import layout
from nodecache.folders import EMPTY, Block, pack
from nodecache.layout import (
    CACHEDIR_TAG,
    FileEntry,
    InvalidName,
    Node,
    RepoView,
    blob_symlink_target,
    build_repo_tree,
    build_root,
    lazy_repo_tree,
    parse_repo_folder,
    parse_repo_spec,
    repo_folder_name,
    snapshot_blocks,
    tree_listing,
    validate_blob_id,
    validate_relpath,
    validate_repo_id,
    validate_revision,
)

C1 = "1" * 40
C2 = "2" * 40
C3 = "c0ffee" + "0" * 34


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gitsha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def node_at(root: Node, path: str) -> Node:
    node = root
    for part in path.split("/"):
        assert node.kind == "dir", f"{part!r} looked up under a {node.kind} node"
        assert part in node.children, f"{path!r}: no {part!r} among {sorted(node.children)}"
        node = node.children[part]
    return node


# --- folder names -------------------------------------------------------------


@pytest.mark.parametrize(
    ("repo_type", "repo_id", "folder"),
    [
        ("model", "org/name", "models--org--name"),
        ("dataset", "org/name", "datasets--org--name"),
        ("space", "org/name", "spaces--org--name"),
        ("model", "gpt2", "models--gpt2"),
        ("dataset", "squad", "datasets--squad"),
        ("model", "meta-llama/Llama-3.1-8B_v2.0", "models--meta-llama--Llama-3.1-8B_v2.0"),
    ],
)
def test_repo_folder_name_round_trip(repo_type, repo_id, folder):
    assert repo_folder_name(repo_type, repo_id) == folder
    assert parse_repo_folder(folder) == (repo_type, repo_id)


@pytest.mark.parametrize(
    "name",
    [
        "models",
        "models--",
        "models--a--b--c",
        "model--org--name",
        "checkpoints--org--name",
        ".locks",
        "CACHEDIR.TAG",
        "version.txt",
        "models--org--..",
        "models--org--.hidden",
        "models----name",
    ],
)
def test_parse_repo_folder_rejects_non_repo_folders(name):
    assert parse_repo_folder(name) is None


def test_repo_folder_name_rejects_bad_type_and_id():
    with pytest.raises(InvalidName):
        repo_folder_name("models", "org/name")  # the plural is the folder prefix, not a type
    with pytest.raises(InvalidName):
        repo_folder_name("model", "org/../name")


def test_every_accepted_repo_id_round_trips():
    """Ids built from the characters that matter to `--` splitting: each one the validator
    accepts must come back from its folder name unchanged, for every repo type."""
    import itertools

    parts = ["".join(p) for n in (1, 2, 3) for p in itertools.product("a-._", repeat=n)]
    candidates = [*parts, *(f"{o}/{n}" for o, n in itertools.product(parts, repeat=2))]
    accepted = []
    for repo_id in candidates:
        try:
            accepted.append(validate_repo_id(repo_id))
        except InvalidName:
            continue
    assert "org-/name" not in accepted and "a-/b" not in accepted, "an org ending in '-' makes '---'"
    assert len(accepted) > 100, len(accepted)  # not vacuous: many ids with '-', '.', '_' inside
    for repo_type in ("model", "dataset", "space"):
        for repo_id in accepted:
            assert parse_repo_folder(repo_folder_name(repo_type, repo_id)) == (repo_type, repo_id), repo_id


# --- validation ---------------------------------------------------------------


@pytest.mark.parametrize("repo_id", ["org/name", "gpt2", "a", "Org_1/model.v2", "a" * 96, "o/" + "n" * 94])
def test_validate_repo_id_accepts(repo_id):
    assert validate_repo_id(repo_id) == repo_id


@pytest.mark.parametrize(
    "repo_id",
    [
        "",
        "..",
        ".",
        "../x",
        "org/..",
        "org/a..b",
        "a/b/c",
        "a--b",
        "org/a--b",
        "/abs",
        "org/",
        "/",
        "org/na\0me",
        "org/na me",
        "org\\name",
        ".hidden",
        "-dash",
        "org/name.",
        "a" * 97,
        "o/" + "n" * 95,
    ],
)
def test_validate_repo_id_rejects(repo_id):
    with pytest.raises(InvalidName):
        validate_repo_id(repo_id)


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/1", "release/2024-01_rc", C3, "a" * 200])
def test_validate_revision_accepts(revision):
    assert validate_revision(revision) == revision


@pytest.mark.parametrize(
    "revision",
    ["", "..", ".", "a/../b", "a/./b", "/x", "x/", "a//b", "ma\0in", "my branch", " main", "a\\b", "a" * 201, "v1@x"],
)
def test_validate_revision_rejects(revision):
    with pytest.raises(InvalidName):
        validate_revision(revision)


@pytest.mark.parametrize(
    ("validate", "name"),
    [
        (validate_repo_id, "org/name\n"),
        (validate_revision, "main\n"),
        (validate_blob_id, "a" * 40 + "\n"),
        (validate_blob_id, "b" * 64 + "\n"),
    ],
)
def test_trailing_newline_is_rejected(validate, name):
    with pytest.raises(InvalidName):
        validate(name)


@pytest.mark.parametrize(
    "path",
    [
        "config.json",
        "a/b/c.json",
        ".gitattributes",
        "dir.with.dots/..x",
        "spaced name/ünïcode €.txt",
        "x" * 255,
        "é" * 127,  # 254 bytes
        "/".join(["d" * 200] * 20),  # 4019 chars
    ],
)
def test_validate_relpath_accepts(path):
    assert validate_relpath(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "",
        "..",
        ".",
        "../etc/passwd",
        "a/../../b",
        "a/..",
        "/etc/passwd",
        "a//b",
        "a/",
        "./a",
        "a/./b",
        "a\0b",
        "a\\b",
        "..\\..\\x",
        "x" * 256,
        "é" * 128,  # 128 characters but 256 bytes
        "a/" + "x" * 256,
        "/".join(["d" * 200] * 21),  # 4220 chars
    ],
)
def test_validate_relpath_rejects(path):
    with pytest.raises(InvalidName):
        validate_relpath(path)


@pytest.mark.parametrize("blob_id", ["0" * 40, "f" * 64, gitsha1(b""), sha256(b"")])
def test_validate_blob_id_accepts(blob_id):
    assert validate_blob_id(blob_id) == blob_id


@pytest.mark.parametrize(
    "blob_id",
    ["", "../x", "a" * 39, "a" * 41, "a" * 63, "a" * 65, "A" * 40, "g" * 40, "a" * 38 + "/x", "ab/" + "a" * 37],
)
def test_validate_blob_id_rejects(blob_id):
    with pytest.raises(InvalidName):
        validate_blob_id(blob_id)


# --- symlink targets ----------------------------------------------------------

BLOB = sha256(b"payload")
BLOB_RAW = bytes.fromhex(BLOB)


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("config.json", f"../../blobs/{BLOB}"),
        ("tok/vocab.txt", f"../../../blobs/{BLOB}"),
        ("a/b/c.json", f"../../../../blobs/{BLOB}"),
    ],
)
def test_blob_symlink_target(path, target):
    assert blob_symlink_target(path, BLOB) == target


@pytest.mark.parametrize("path", ["config.json", "tok/vocab.txt", "a/b/c.json", "1/2/3/4/5/6/deep.bin"])
def test_blob_symlink_target_resolves_to_the_blob_on_disk(tmp_path, path):
    repo = tmp_path / "hub" / "models--org--name"
    blob = repo / "blobs" / BLOB
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"payload")
    link = repo / "snapshots" / C1 / path
    link.parent.mkdir(parents=True)
    target = blob_symlink_target(path, BLOB)

    # Lexically, from the link's directory...
    assert os.path.normpath(os.path.join(link.parent, target)) == str(blob)
    # ...and for real, through the file system.
    os.symlink(target, link)
    assert os.path.realpath(link) == os.path.realpath(blob)
    assert link.read_bytes() == b"payload"


def test_blob_symlink_target_rejects_bad_names():
    with pytest.raises(InvalidName):
        blob_symlink_target("../x", BLOB)
    with pytest.raises(InvalidName):
        blob_symlink_target("x", "../../etc/passwd")
    with pytest.raises(InvalidName):
        blob_symlink_target("x", "abc")


# --- the tree -----------------------------------------------------------------


def test_refs_hold_the_commit_without_trailing_newline_and_nest():
    tree = build_repo_tree(RepoView("model", "org/name", {"main": C1, "refs/pr/1": C2, "v1.0": C1}, {}))
    assert sorted(tree.children) == ["blobs", "refs", "snapshots"]
    main = node_at(tree, "refs/main")
    assert main.kind == "static"
    assert main.data == C1.encode()
    assert main.size == 40
    assert not main.data.endswith(b"\n")
    assert node_at(tree, "refs/refs").kind == "dir"
    assert node_at(tree, "refs/refs/pr").kind == "dir"
    pr = node_at(tree, "refs/refs/pr/1")
    assert (pr.kind, pr.data, pr.size) == ("static", C2.encode(), 40)
    assert node_at(tree, "refs/v1.0").data == C1.encode()
    assert sorted(tree.children["refs"].children) == ["main", "refs", "v1.0"]


def test_snapshot_nesting_and_shared_blobs():
    config, weights = b'{"a": 1}', b"\x00" * 1000
    cid, wid = gitsha1(config), sha256(weights)
    files = [
        FileEntry("config.json", len(config), cid),
        FileEntry("a/b/c.json", len(config), cid),  # same content: same blob
        FileEntry("a/model.safetensors", len(weights), wid),
    ]
    tree = build_repo_tree(RepoView("model", "org/name", {"main": C1}, {C1: files}))

    assert node_at(tree, f"snapshots/{C1}/a").kind == "dir"
    assert node_at(tree, f"snapshots/{C1}/a/b").kind == "dir"
    assert sorted(node_at(tree, f"snapshots/{C1}").children) == ["a", "config.json"]
    assert sorted(node_at(tree, f"snapshots/{C1}/a").children) == ["b", "model.safetensors"]
    top = node_at(tree, f"snapshots/{C1}/config.json")
    assert (top.kind, top.target) == ("symlink", f"../../blobs/{cid}")
    nested = node_at(tree, f"snapshots/{C1}/a/b/c.json")
    assert (nested.kind, nested.target) == ("symlink", f"../../../../blobs/{cid}")
    assert node_at(tree, f"snapshots/{C1}/a/model.safetensors").target == f"../../../blobs/{wid}"

    blobs = tree.children["blobs"].children
    assert sorted(blobs) == sorted([cid, wid])  # two files, one blob node
    assert (blobs[cid].kind, blobs[cid].blob_id, blobs[cid].size) == ("blob", cid, len(config))
    assert (blobs[wid].kind, blobs[wid].size) == ("blob", len(weights))


def test_two_commits_share_blobs():
    old, new, common = b"old", b"new", b"same in both"
    oid, nid, sid = gitsha1(old), gitsha1(new), sha256(common)
    view = RepoView(
        "dataset",
        "org/data",
        {"main": C2},
        {
            C1: [FileEntry("data.txt", 3, oid), FileEntry("big.bin", len(common), sid)],
            C2: [FileEntry("data.txt", 3, nid), FileEntry("big.bin", len(common), sid)],
        },
    )
    tree = build_repo_tree(view)
    assert sorted(tree.children["snapshots"].children) == [C1, C2]
    assert sorted(tree.children["blobs"].children) == sorted([oid, nid, sid])
    assert node_at(tree, f"snapshots/{C1}/data.txt").target.endswith(oid)
    assert node_at(tree, f"snapshots/{C2}/data.txt").target.endswith(nid)
    assert node_at(tree, f"snapshots/{C1}/big.bin").target == node_at(tree, f"snapshots/{C2}/big.bin").target


def test_snapshot_with_known_empty_file_list_is_listed():
    tree = build_repo_tree(RepoView("model", "org/name", {}, {C1: []}))
    assert node_at(tree, f"snapshots/{C1}").kind == "dir"
    assert tree.children["snapshots"].children[C1].children == {}
    assert tree.children["blobs"].children == {}
    assert tree.children["refs"].children == {}


@pytest.mark.parametrize(
    "view",
    [
        RepoView("model", "org/name", {"../escape": C1}, {}),
        RepoView("model", "org/name", {"a b": C1}, {}),
        RepoView("model", "org/name", {}, {"../x": []}),
        RepoView("model", "org/name", {}, {"C" * 40: []}),
        RepoView("model", "org/name", {}, {C1: [FileEntry("../../x", 1, BLOB)]}),
        RepoView("model", "org/name", {}, {C1: [FileEntry("/etc/passwd", 1, BLOB)]}),
        RepoView("model", "org/name", {}, {C1: [FileEntry("x", 1, "../../etc/passwd")]}),
    ],
)
def test_build_repo_tree_rejects_bad_names(view):
    with pytest.raises(InvalidName):
        build_repo_tree(view)


def test_build_root_hub_layout():
    views = [
        RepoView("model", "org/name", {"main": C1}, {C1: [FileEntry("config.json", 2, gitsha1(b"{}"))]}),
        RepoView("dataset", "squad", {"main": C2}, {C2: []}),
    ]
    root = build_root(views)
    assert list(root.children) == ["hub"]
    hub = root.children["hub"]
    assert sorted(hub.children) == [".locks", "CACHEDIR.TAG", "datasets--squad", "models--org--name"]
    assert "version.txt" not in hub.children
    tag = hub.children["CACHEDIR.TAG"]
    assert tag.kind == "static"
    assert tag.data == CACHEDIR_TAG and tag.size == len(CACHEDIR_TAG)
    assert tag.data.startswith(b"Signature: 8a477f597d28d172789f06886806bc55")
    locks = hub.children[".locks"]
    assert locks.kind == "dir"
    assert sorted(locks.children) == ["datasets--squad", "models--org--name"]
    assert all(n.kind == "dir" and not n.children for n in locks.children.values())


def test_build_root_without_repos():
    hub = build_root([]).children["hub"]
    assert sorted(hub.children) == [".locks", "CACHEDIR.TAG"]
    assert hub.children[".locks"].children == {}


def test_walk_lists_parents_before_children():
    view = RepoView("model", "org/name", {"main": C1}, {C1: [FileEntry("a/b.txt", 1, gitsha1(b"x"))]})
    paths = [p for p, _ in layout.walk(build_root([view]))]
    assert len(paths) == len(set(paths))
    for p in paths:
        if "/" in p:
            assert paths.index(p.rsplit("/", 1)[0]) < paths.index(p)
    assert f"hub/models--org--name/snapshots/{C1}/a/b.txt" in paths


def materialize(root: Node, dest: Path, contents: dict[str, bytes]) -> None:
    """Write the presented tree to a real directory, as the FUSE mount shows it."""
    for path, node in layout.walk(root):
        p = dest / path
        if node.kind == "dir":
            p.mkdir()
        elif node.kind == "static":
            p.write_bytes(node.data)
        elif node.kind == "symlink":
            os.symlink(node.target, p)
        else:
            assert len(contents[node.blob_id]) == node.size
            p.write_bytes(contents[node.blob_id])


def test_tree_is_a_valid_hub_cache_for_huggingface_hub(tmp_path):
    """Written to disk, the tree is read by huggingface_hub itself as a sound cache."""
    config, vocab, weights = b'{"model_type": "tiny"}', b"a\nb\n", os.urandom(4096)
    contents = {gitsha1(config): config, gitsha1(vocab): vocab, sha256(weights): weights}
    files = [
        FileEntry("config.json", len(config), gitsha1(config)),
        FileEntry("tokenizer/vocab.txt", len(vocab), gitsha1(vocab)),
        FileEntry("model.safetensors", len(weights), sha256(weights)),
    ]
    views = [
        RepoView("model", "org/name", {"main": C1, "refs/pr/1": C2}, {C1: files, C2: files[:1]}),
        RepoView("dataset", "org/data", {"main": C3}, {C3: [files[1]]}),
    ]
    materialize(build_root(views), tmp_path, contents)
    hub = tmp_path / "hub"

    info = scan_cache_dir(hub)
    assert info.warnings == []
    by_id = {(r.repo_type, r.repo_id): r for r in info.repos}
    assert set(by_id) == {("model", "org/name"), ("dataset", "org/data")}
    model = by_id["model", "org/name"]
    revs = {r.commit_hash: r for r in model.revisions}
    assert set(revs) == {C1, C2}
    assert revs[C1].refs == frozenset({"main"})
    assert revs[C2].refs == frozenset({"refs/pr/1"})
    assert model.size_on_disk == len(config) + len(vocab) + len(weights)  # blobs counted once

    for rev in ("main", C1):
        got = try_to_load_from_cache("org/name", "tokenizer/vocab.txt", cache_dir=hub, revision=rev)
        assert isinstance(got, str) and Path(got).read_bytes() == vocab
        assert os.path.realpath(got) == str((hub / "models--org--name" / "blobs" / gitsha1(vocab)).resolve())
    got = try_to_load_from_cache("org/name", "config.json", cache_dir=hub, revision="refs/pr/1")
    assert Path(got).read_bytes() == config
    assert try_to_load_from_cache("org/name", "model.safetensors", cache_dir=hub, revision="refs/pr/1") is None
    got = try_to_load_from_cache("org/data", "tokenizer/vocab.txt", cache_dir=hub, repo_type="dataset")
    assert Path(got).read_bytes() == vocab


# --- repo specs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("org/name", ("model", "org/name", "main")),
        ("gpt2", ("model", "gpt2", "main")),
        ("org/name@v1", ("model", "org/name", "v1")),
        (f"org/name@{C3}", ("model", "org/name", C3)),
        ("datasets/org/name", ("dataset", "org/name", "main")),
        ("datasets/org/name@refs/pr/1", ("dataset", "org/name", "refs/pr/1")),
        ("spaces/org/app@main", ("space", "org/app", "main")),
        ("models/org/name@dev", ("model", "org/name", "dev")),
    ],
)
def test_parse_repo_spec(spec, expected):
    assert parse_repo_spec(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "@main",
        "a/b/c",
        "datasets/a/b/c",
        "org/name@..",
        "org/name@refs/../x",
        "org/name@a b",
        "org/name@v1@v2",
        "org/name@/x",
        "../org/name",
        "org--x/name",
        "/org/name",
        "org/name\0",
    ],
)
def test_parse_repo_spec_rejects(spec):
    with pytest.raises(InvalidName):
        parse_repo_spec(spec)


def _tree_listing_by_definition(ids: dict[str, str], base: str, recursive: bool):
    """The Hub's listing spelled out naively (O(folders x files)): what tree_listing must equal."""
    prefix = base + "/" if base else ""
    files, dirs = [], set()
    for path in ids:
        if path.startswith(prefix):
            parts = path[len(prefix) :].split("/")
            depth = len(parts) - 1 if recursive else min(1, len(parts) - 1)
            dirs.update(prefix + "/".join(parts[:i]) for i in range(1, depth + 1))
            if recursive or len(parts) == 1:
                files.append(path)
    oids = {}
    for d in dirs:
        listing = "".join(f"{p}\0{i}\n" for p, i in ids.items() if p.startswith(d + "/"))
        oids[d] = hashlib.sha1(listing.encode()).hexdigest()
    return files, oids


@pytest.mark.parametrize("base", ["", "a", "a/b", "c", "missing"])
@pytest.mark.parametrize("recursive", [False, True])
def test_tree_listing_matches_its_definition(base, recursive):
    ids = {p: gitsha1(p.encode()) for p in ["x.json", "a/1", "a/b/2", "a/b/c/3", "a/bb/4", "c/5", "ab/6", "a/7"]}
    assert tree_listing(ids, base, recursive) == _tree_listing_by_definition(ids, base, recursive)


def test_tree_listing_is_linear_in_files():
    """10^5 files in 10^3 folders: one pass, not folders x files (that took minutes)."""
    import time

    ids = {f"part-{i // 100:04d}/shard-{i:06d}": BLOB for i in range(100_000)}
    t0 = time.perf_counter()
    files, oids = tree_listing(ids, "", True)
    assert len(files) == 100_000 and len(oids) == 1000
    assert time.perf_counter() - t0 < 10


def test_lazy_folders_read_one_folder_at_a_time_from_compact_blocks():
    """A snapshot folder is asked for when it is used, alone; its table is read-only and sorted."""
    folders, blobs = snapshot_blocks([FileEntry(f"d/f{i}", i, BLOB) for i in (3, 1, 2)] + [FileEntry("top", 9, BLOB)])
    calls = []

    def folder_of(commit, path):
        calls.append((commit, path))
        raw = folders.get(path) if commit == C1 else None
        return None if raw is None else Block(raw)

    repo = lazy_repo_tree({"main": C1}, [C1, C2], folder_of, lambda: Block(blobs))
    assert calls == []  # nothing read until a snapshot is looked into
    snap = repo.children["snapshots"].children[C1]
    assert list(snap.names()) == ["d", "top"] and set(calls) == {(C1, "")}  # asked each time: the caller caches
    d = snap.children["d"]
    assert set(calls) == {(C1, "")}  # a sub-folder is read when it is looked into
    assert list(d.names()) == ["f1", "f2", "f3"] and set(calls) == {(C1, ""), (C1, "d")}
    assert d.children["f2"].target == "../../../blobs/" + BLOB
    assert "f4" not in d.children and d.children.get("f4") is None and d.children.get("../top") is None
    with pytest.raises(TypeError):
        d.put("f0", Node("static", data=b""))
    assert list(repo.children["snapshots"].children[C2].names()) == []  # no such snapshot: empty
    assert (repo.children["blobs"].children[BLOB].size, list(repo.children["blobs"].names())) == (9, [BLOB])
    table = d.children  # by position (what numbers entries: a range's base + position)
    assert [table.index(n) for n in ("f1", "f3", "f4", "../x", 7)] == [0, 2, -1, -1, -1]
    assert [(name, node.target) for name, node in (table.at(i) for i in range(3))] == [
        (f"f{i}", "../../../blobs/" + BLOB) for i in (1, 2, 3)
    ]


def test_block_find_agrees_with_a_scan_whatever_it_was_asked_before():
    keys = sorted({hashlib.sha1(b"%d" % i).digest()[: 1 + i % 20] for i in range(500)})
    block = Block(pack((k, b"") for k in keys))
    asked = [*keys, b"\0", b"\xff" * 30, keys[3], keys[3], keys[3] + b"\0", keys[7][:-1], keys[7]]
    assert [block.find(k) for k in asked] == [keys.index(k) if k in keys else -1 for k in asked]
    assert EMPTY.find(b"") == -1 and EMPTY.find(b"a") == -1


def test_dict_folders_keep_sorted_names_through_put():
    d = Node.dir()
    for name in ("f3", "f1", "f2"):
        d.put(name, Node("static", data=b""))
    assert list(d.names()) == ["f1", "f2", "f3"]
    d.put("f0", Node("static", data=b""))
    d.put("f2", None)
    assert d.names() == ["f0", "f1", "f3"] == sorted(d.children)


def test_folder_blocks_refuse_what_they_cannot_describe():
    raw = pack([(b"a", b"x"), (b"b", b"")])
    block = Block(raw)
    assert [block.entry(i) for i in range(len(block))] == [(b"a", b"x"), (b"b", b"")]
    assert block.find(b"b") == 1 and block.find(b"c") == -1
    for bad in (b"", raw[:-1], raw + b"z", raw[:4] + b"\xff\xff\xff\xff" + raw[8:], b"\xff\xff\xff\x7f"):
        with pytest.raises(ValueError):
            Block(bad)


def test_a_tampered_block_is_an_unknown_name_not_a_path():
    """Entries are checked when read: a key with a slash, `..`, or a payload that is not an id."""
    bad = Block(pack([(b"..", b""), (b"a/b", BLOB_RAW), (b"ok", b"\x01\x02")]))
    repo = lazy_repo_tree({}, [C1], lambda c, p: bad, lambda: EMPTY)
    snap = repo.children["snapshots"].children[C1]
    for name in ("..", "a/b", "ok"):
        with pytest.raises(InvalidName):
            snap.children[name]
